"""Building upstream ``Sam3Image`` models: full size, tiny, random or from a checkpoint.

The full model is upstream's own ``build_sam3_image_model``; the tiny one composes the
same upstream classes at small sizes so that the fast test tier exercises the same code.
Every model built here carries a :class:`BuildInfo` (:func:`build_info`), which the export
records in the artifact's manifest.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import weakref
from typing import Any, Literal

import torch
from torch import nn

from ..patching.selection import exportable_sam3
from ..tokenizer import bpe_vocab_path
from .checkpoints import load_checkpoint

__all__ = ["TINY", "BuildInfo", "build_info", "build_model", "init_unfilled_parameters"]

log = logging.getLogger(__name__)

Size = Literal["full", "tiny"]

#: Sizes of the tiny model (all derived sizes follow upstream's constraints: position
#: encoding width == d_model, decoder resolution/stride == image/patch, global attention
#: in the last ViT block).
TINY = {
    "image_size": 224,
    "patch_size": 14,
    "vit_dim": 64,
    "vit_depth": 2,
    "vit_heads": 2,
    "d_model": 64,
    "heads": 4,
    "ffn": 128,
    "text_width": 64,
    "text_layers": 2,
    "text_heads": 2,
    "num_queries": 16,
    "encoder_layers": 2,
    "decoder_layers": 2,
}


@dataclasses.dataclass(frozen=True)
class BuildInfo:
    """Where a model's weights came from, as the manifest records it (``"model"``)."""

    size: str
    parameters: int
    checkpoint: str | None
    random_weights: bool
    seed: int | None
    missing_keys: int = 0
    unexpected_keys: int = 0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_BUILD_INFO: weakref.WeakKeyDictionary[nn.Module, BuildInfo] = weakref.WeakKeyDictionary()


def build_info(model: nn.Module) -> BuildInfo:
    """The :class:`BuildInfo` of a model made by :func:`build_model`; for any other model,
    what can be told from it (its parameter count; weights of unknown origin)."""
    info = _BUILD_INFO.get(model)
    if info is not None:
        return info
    return BuildInfo(
        size="custom",
        parameters=sum(p.numel() for p in model.parameters()),
        checkpoint=None,
        random_weights=False,
        seed=None,
    )


def init_unfilled_parameters(model: nn.Module, generator: torch.Generator) -> list[str]:
    """Initialise the parameters upstream creates with ``torch.empty`` (filled only by a
    checkpoint): the text transformer's ``positional_embedding`` (normal, std 0.01) and
    ``text_projection`` (normal, std width**-0.5), and any multi-level ``level_embed``
    (normal). Returns the qualified names it filled.
    """
    from sam3.model.encoder import TransformerEncoder
    from sam3.model.text_encoder_ve import TextTransformer

    filled: list[str] = []
    with torch.no_grad():
        for name, module in model.named_modules():
            prefix = f"{name}." if name else ""
            if isinstance(module, TextTransformer):
                module.positional_embedding.normal_(0.0, 0.01, generator=generator)
                filled.append(prefix + "positional_embedding")
                if isinstance(module.text_projection, nn.Parameter):
                    module.text_projection.normal_(0.0, module.width**-0.5, generator=generator)
                    filled.append(prefix + "text_projection")
            if isinstance(module, TransformerEncoder) and module.level_embed is not None:
                module.level_embed.normal_(0.0, 1.0, generator=generator)
                filled.append(prefix + "level_embed")
    return filled


def _build_full() -> nn.Module:
    from sam3.model_builder import build_sam3_image_model

    return build_sam3_image_model(
        bpe_path=bpe_vocab_path(),
        device="cpu",
        eval_mode=True,
        checkpoint_path=None,
        load_from_HF=False,
        enable_segmentation=True,
        enable_inst_interactivity=False,
        compile=False,
    )


def _build_tiny() -> nn.Module:
    from sam3.model.decoder import TransformerDecoder, TransformerDecoderLayer
    from sam3.model.encoder import TransformerEncoderFusion, TransformerEncoderLayer
    from sam3.model.geometry_encoders import SequenceGeometryEncoder
    from sam3.model.maskformer_segmentation import PixelDecoder, UniversalSegmentationHead
    from sam3.model.model_misc import MLP, DotProductScoring, TransformerWrapper
    from sam3.model.model_misc import MultiheadAttentionWrapper as MHA
    from sam3.model.necks import Sam3DualViTDetNeck
    from sam3.model.position_encoding import PositionEmbeddingSine
    from sam3.model.text_encoder_ve import VETextEncoder
    from sam3.model.tokenizer_ve import SimpleTokenizer
    from sam3.model.vitdet import ViT
    from sam3.model.vl_combiner import SAM3VLBackbone
    from sam3.model_builder import _create_sam3_model

    t = TINY
    d = t["d_model"]

    def pos_enc(precompute: int | None = None) -> PositionEmbeddingSine:
        return PositionEmbeddingSine(num_pos_feats=d, precompute_resolution=precompute)

    def enc_layer(batch_first: bool, pos_at_attn: bool, pos_at_keys: bool) -> TransformerEncoderLayer:
        return TransformerEncoderLayer(
            activation="relu",
            d_model=d,
            dim_feedforward=t["ffn"],
            dropout=0.1,
            pos_enc_at_attn=pos_at_attn,
            pos_enc_at_cross_attn_keys=pos_at_keys,
            pos_enc_at_cross_attn_queries=False,
            pre_norm=True,
            self_attention=MHA(num_heads=t["heads"], dropout=0.1, embed_dim=d, batch_first=batch_first),
            cross_attention=MHA(num_heads=t["heads"], dropout=0.1, embed_dim=d, batch_first=batch_first),
        )

    vit = ViT(
        img_size=t["image_size"],
        pretrain_img_size=t["image_size"],
        patch_size=t["patch_size"],
        embed_dim=t["vit_dim"],
        depth=t["vit_depth"],
        num_heads=t["vit_heads"],
        mlp_ratio=4.0,
        norm_layer="LayerNorm",
        drop_path_rate=0.0,
        qkv_bias=True,
        use_abs_pos=True,
        tile_abs_pos=True,
        global_att_blocks=(t["vit_depth"] - 1,),
        rel_pos_blocks=(),
        use_rope=True,
        use_interp_rope=True,
        window_size=8,
        pretrain_use_cls_token=True,
        retain_cls_token=False,
        ln_pre=True,
        ln_post=False,
        return_interm_layers=False,
        bias_patch_embed=False,
    )
    neck = Sam3DualViTDetNeck(
        position_encoding=pos_enc(precompute=t["image_size"]),
        d_model=d,
        scale_factors=[4.0, 2.0, 1.0, 0.5],
        trunk=vit,
        add_sam2_neck=False,
    )
    text = VETextEncoder(
        tokenizer=SimpleTokenizer(bpe_path=bpe_vocab_path()),
        d_model=d,
        width=t["text_width"],
        heads=t["text_heads"],
        layers=t["text_layers"],
    )
    backbone = SAM3VLBackbone(visual=neck, text=text, scalp=1)
    encoder = TransformerEncoderFusion(
        layer=enc_layer(batch_first=True, pos_at_attn=True, pos_at_keys=False),
        num_layers=t["encoder_layers"],
        d_model=d,
        num_feature_levels=1,
        frozen=False,
        use_act_checkpoint=True,
        add_pooled_text_to_img_feat=False,
        pool_text_with_mask=True,
    )
    decoder = TransformerDecoder(
        layer=TransformerDecoderLayer(
            activation="relu",
            d_model=d,
            dim_feedforward=t["ffn"],
            dropout=0.1,
            cross_attention=MHA(num_heads=t["heads"], dropout=0.1, embed_dim=d),
            n_heads=t["heads"],
            use_text_cross_attention=True,
        ),
        num_layers=t["decoder_layers"],
        num_queries=t["num_queries"],
        return_intermediate=True,
        box_refine=True,
        num_o2m_queries=0,
        dac=True,
        boxRPB="log",
        d_model=d,
        frozen=False,
        interaction_layer=None,
        dac_use_selfatt_ln=True,
        resolution=t["image_size"],
        stride=t["patch_size"],
        use_act_checkpoint=True,
        presence_token=True,
    )
    scoring = DotProductScoring(
        d_model=d,
        d_proj=d,
        prompt_mlp=MLP(
            input_dim=d,
            hidden_dim=t["ffn"],
            output_dim=d,
            num_layers=2,
            dropout=0.1,
            residual=True,
            out_norm=nn.LayerNorm(d),
        ),
    )
    seg_head = UniversalSegmentationHead(
        hidden_dim=d,
        upsampling_stages=3,
        aux_masks=False,
        presence_head=False,
        dot_product_scorer=None,
        act_ckpt=True,
        cross_attend_prompt=MHA(num_heads=t["heads"], dropout=0, embed_dim=d),
        pixel_decoder=PixelDecoder(num_upsampling_stages=3, interpolation_mode="nearest", hidden_dim=d),
    )
    geometry = SequenceGeometryEncoder(
        pos_enc=pos_enc(),
        encode_boxes_as_points=False,
        points_direct_project=True,
        points_pool=True,
        points_pos_enc=True,
        boxes_direct_project=True,
        boxes_pool=True,
        boxes_pos_enc=True,
        d_model=d,
        num_layers=1,
        layer=enc_layer(batch_first=False, pos_at_attn=False, pos_at_keys=True),
        use_act_ckpt=True,
        add_cls=True,
        add_post_encode_proj=True,
    )
    model = _create_sam3_model(
        backbone,
        TransformerWrapper(encoder=encoder, decoder=decoder, d_model=d),
        geometry,
        seg_head,
        scoring,
        None,
        True,
    )
    return model.eval()


def build_model(
    size: Size = "full",
    checkpoint: str | os.PathLike[str] | None = None,
    seed: int = 0,
    device: str | torch.device = "cpu",
    *,
    allow_missing_keys: bool = False,
    strict_checkpoint: bool = False,
    runtime_patches: bool = True,
) -> nn.Module:
    """Build an upstream ``Sam3Image`` in eval mode.

    Args:
        size: ``"full"`` (upstream's ``build_sam3_image_model``, 840.5M parameters, 1008
            px) or ``"tiny"`` (about 4M parameters from the same classes, 224 px).
        checkpoint: optional upstream-format checkpoint: a path or an ``hf://`` reference
            such as ``"hf://facebook/sam3"`` (see :mod:`.checkpoints`).
        seed: every parameter is initialised deterministically from it; two builds with
            the same seed are bitwise equal.
        device: where the returned model lives (building happens on CPU, no hub download
            unless ``checkpoint`` is an ``hf://`` reference).
        allow_missing_keys: load a checkpoint that lacks some of the model's tensors (they
            keep their random initialisation; the manifest records how many).
        strict_checkpoint: also refuse unexpected checkpoint keys.
        runtime_patches: build inside :func:`exportable_sam3` (needed without CUDA);
            False builds with upstream as installed (e.g. a copy with ``patches/`` applied).

    Raises ``ValueError`` for an unknown size, :class:`~..errors.CheckpointError` for a bad
    checkpoint, one with missing keys (unless ``allow_missing_keys``), or one that cannot be
    fetched.
    """
    if size not in ("full", "tiny"):
        raise ValueError(f"build_model size: expected 'full' or 'tiny', got {size!r}")
    build = _build_full if size == "full" else _build_tiny
    patches = exportable_sam3() if runtime_patches else contextlib.nullcontext()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        with patches:
            model = build()
        generator = torch.Generator().manual_seed(seed)
        init_unfilled_parameters(model, generator)
    missing = unexpected = 0
    if checkpoint is not None:
        report = load_checkpoint(
            model, checkpoint, strict=strict_checkpoint, allow_missing_keys=allow_missing_keys
        )
        missing, unexpected = len(report.missing), len(report.unexpected)
    model = model.to(device).eval()
    _BUILD_INFO[model] = BuildInfo(
        size=size,
        parameters=sum(p.numel() for p in model.parameters()),
        checkpoint=os.fspath(checkpoint) if checkpoint is not None else None,
        random_weights=checkpoint is None,
        seed=seed if checkpoint is None else None,
        missing_keys=missing,
        unexpected_keys=unexpected,
    )
    return model
