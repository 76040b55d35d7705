"""Deterministic calls into every patched upstream function, for diff-vs-runtime equivalence.

Imported by the test process (under runtime patches) and by a child process that runs a
copy of upstream with ``patches/`` applied; both must produce bitwise the same tensors.
"""

from __future__ import annotations

import torch


def probe(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1234)
    d = model.transformer.d_model
    out: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        geo = model.geometry_encoder
        bs, n = 3, 2
        boxes = torch.rand(n, bs, 4, generator=g) * 0.5 + 0.25
        feats = torch.randn(bs, d, 16, 16, generator=g)
        mask = torch.zeros(bs, n, dtype=torch.bool)
        labels = torch.ones(n, bs, dtype=torch.long)
        out["encode_boxes"] = geo._encode_boxes(boxes, mask, labels, feats)[0]
        xy = torch.rand(4, 5, generator=g)
        out["encode_xy"] = torch.cat(geo.pos_enc._encode_xy(xy[0], xy[1]), dim=1)
        pos = model.backbone.vision_backbone.position_encoding
        out["position_encoding"] = pos(torch.zeros(2, 1, 56, 56))
        src = torch.randn(2, d, 4, 5, generator=g)
        src_pos = torch.randn(2, d, 4, 5, generator=g)
        prompt = torch.randn(7, 2, d, generator=g)
        enc = model.transformer.encoder(
            src=[src],
            prompt=prompt,
            src_pos=[src_pos],
            prompt_key_padding_mask=torch.zeros(2, 7, dtype=torch.bool),
        )
        out["encoder_without_feat_sizes"] = enc["memory"]
        ref = torch.rand(16, 3, 4, generator=g)
        out["rpb"] = model.transformer.decoder._get_rpb_matrix(ref, (torch.tensor(16), torch.tensor(16)))
        from sam3.model.geometry_encoders import concat_padded_sequences

        seq2 = torch.randn(6, 3, d, generator=g)
        mask2 = torch.arange(6)[None].repeat(3, 1) >= torch.tensor([[6], [2], [4]])
        empty, empty_mask = torch.zeros(0, 3, d), torch.zeros(3, 0, dtype=torch.bool)
        seq, mask = concat_padded_sequences(empty, empty_mask, seq2, mask2)
        out["concat_after_empty"], out["concat_after_empty_mask"] = seq, mask
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        attn = model.transformer.encoder.layers[0].cross_attn_image  # batch-first, batch 3
        memory = torch.randn(3, 20, d, generator=g)  # seen seq-first: a (20, 3, d) view
        queries = torch.randn(3, 5, d, generator=g)
        out["mha_under_autocast"] = attn(queries, memory, memory)[0].float()
    return out
