"""The one graph's two stages (``encode_images``, ``ground``) in one artifact, weights once,
and the Predictor's image-feature cache (tiny model)."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import assert_bitwise, eager, run_cli
from PIL import Image

import sam3_exportable as s3e
from sam3_exportable.artifact import load_artifact, read_manifest
from sam3_exportable.artifact.manifest import ENCODE_IMAGES, GROUND, Manifest, StagesInfo
from sam3_exportable.artifact.pt2 import load_pipeline, save_pipeline
from sam3_exportable.errors import ArtifactError, InputSpecError
from sam3_exportable.export import export_stages
from sam3_exportable.export.recipe import build_artifact
from sam3_exportable.export.stages import stage_dims
from sam3_exportable.export.trace import audit_dynamic_shapes, example_inputs
from sam3_exportable.predict import Predictor, keep_pair
from sam3_exportable.predict.cache import FeatureCache, pixels_key

#: Shapes never used at trace time (traced at B = P = 3).
UNSEEN = [(1, 1), (2, 1), (1, 4), (4, 2)]


@pytest.fixture(scope="module")
def staged(tmp_path_factory) -> Path:
    """``export --stages --verify 2,1`` of the tiny model (seed 0: the session's tiny_model),
    as a user runs it; shared, never modify."""
    out = tmp_path_factory.mktemp("staged") / "tiny-staged.pt2"
    args = ["export", "--size", "tiny", "--random-weights", "--malloc", "default", "--stages"]
    status, stdout, err = run_cli(
        [*args, "--out", str(out), "--verify", "2,1", "--threads", str(torch.get_num_threads())]
    )
    assert status == 0, err
    assert "verify: ground(encode_images(x)) == eager, bitwise" in stdout
    assert "verify: exported == eager, bitwise" in stdout
    return out


def _payload_bytes(path: Path) -> int:
    with zipfile.ZipFile(path) as archive:
        return sum(i.file_size for i in archive.infolist() if "/data/weights/" in i.filename)


def test_the_stages_compose_to_the_one_graph_bitwise(staged, tiny_ep, tiny_wrapper) -> None:
    artifact = load_artifact(staged)
    assert artifact.has_stages
    for batch, prompts in UNSEEN:
        images, tokens = example_inputs(tiny_wrapper, batch, prompts, seed=7)
        expected = tiny_ep.module()(images, tokens)
        features = artifact.encode_images(images)
        assert len(features) == len(artifact.manifest.stages.features)
        assert_bitwise(expected, artifact.ground(features, tokens))
        assert_bitwise(expected, artifact(images, tokens))


def test_the_eager_stages_are_the_eager_wrapper(tiny_wrapper) -> None:
    images, tokens = example_inputs(tiny_wrapper, 2, 3, seed=3)
    with s3e.exportable_sam3():
        features = tiny_wrapper.encode_images(images)
        assert_bitwise(eager(tiny_wrapper, images, tokens), tiny_wrapper.ground(features, tokens))
    assert [tuple(f.shape[1:]) for f in features] == [(64, 64, 64), (64, 32, 32), (64, 16, 16), (64, 16, 16)]
    assert tiny_wrapper.feature_names == (
        "backbone_fpn_0",
        "backbone_fpn_1",
        "backbone_fpn_2",
        "vision_pos_enc_2",
    )


def test_the_manifest_documents_the_features_and_audits(staged) -> None:
    manifest = read_manifest(staged)
    assert manifest.stages is not None
    features = manifest.stages.features
    assert [f.name for f in features] == [
        "backbone_fpn_0",
        "backbone_fpn_1",
        "backbone_fpn_2",
        "vision_pos_enc_2",
    ]
    assert features[0].shape == ("batch", 64, 64, 64)
    assert {f.dtype for f in features} == {"float32"}
    assert manifest.stages.audits[ENCODE_IMAGES]["ranges"] == {"batch": [1, "inf"]}
    assert manifest.stages.audits[GROUND]["ranges"] == {"batch": [1, "inf"], "num_prompts": [1, "inf"]}
    assert manifest.summary()["stages"][0]["name"] == "backbone_fpn_0"
    copy = json.loads(Path(f"{staged}.json").read_text())
    assert copy["stages"]["features"][3] == {
        "name": "vision_pos_enc_2",
        "shape": ["batch", 64, 16, 16],
        "dtype": "float32",
    }


def test_the_loaded_stage_programs_keep_batch_and_prompts_symbolic(staged) -> None:
    artifact = load_artifact(staged)
    count = len(artifact.manifest.stages.features)
    dims = stage_dims(count, boxes=False)
    names = {ENCODE_IMAGES: ("images",), GROUND: ("features", "token_ids")}
    inf = float("inf")
    encode = audit_dynamic_shapes(
        artifact.stage_programs[ENCODE_IMAGES], dims[ENCODE_IMAGES], names[ENCODE_IMAGES]
    )
    assert encode.ranges == {"batch": (1, inf)}
    ground = audit_dynamic_shapes(artifact.stage_programs[GROUND], dims[GROUND], names[GROUND])
    assert ground.ranges == {"batch": (1, inf), "num_prompts": (1, inf)}


def test_the_weights_are_stored_once(staged, tiny_artifact) -> None:
    """Three programs, one copy of the weights: the staged archive's weight records add at
    most 2% to the one-graph archive's (the same model: seed 0)."""
    one, three = _payload_bytes(tiny_artifact), _payload_bytes(staged)
    assert one > 10 * 2**20
    assert three <= 1.02 * one, (three, one)
    with zipfile.ZipFile(staged) as archive:
        names = archive.namelist()
        assert {n.split("/")[-1] for n in names if "/models/" in n} == {
            "model.json",
            "encode_images.json",
            "ground.json",
        }
        records = {n.split("/data/weights/")[-1] for n in names if "/data/weights/weight_" in n}
        for program in ("model", ENCODE_IMAGES, GROUND):
            config = json.loads(
                archive.read(next(n for n in names if n.endswith(f"{program}_weights_config.json")))
            )
            used = [meta["path_name"] for meta in config["config"].values()]
            assert set(used) <= records  # every weight a record of this archive
            assert len(used) == len(set(used))  # never two tensors of one program on one record


def test_the_plain_torch_loader_gives_the_same_stages(staged, tiny_wrapper) -> None:
    """Without the fast loader (weights copied, not mapped) the stages run the same."""
    fast, plain = load_pipeline(staged), load_pipeline(staged, fast=False)
    images, tokens = example_inputs(tiny_wrapper, 2, 2, seed=4)
    features = fast.encode_images(images)
    for a, b in zip(features, plain.encode_images(images), strict=True):
        assert torch.equal(a, b)
    assert_bitwise(fast.ground(features, tokens), plain.ground(features, tokens))


def test_box_capable_stages_compose_bitwise(tiny_model, box_ep, tiny_wrapper, tmp_path) -> None:
    path = tmp_path / "boxes-staged.pt2"
    save_pipeline(box_ep, path, stages=export_stages(tiny_model, boxes=True))
    artifact = load_artifact(path)
    assert artifact.takes_boxes and artifact.has_stages
    inf = float("inf")
    count = len(artifact.manifest.stages.features)
    names = ("features", "token_ids", "boxes", "box_labels", "box_valid")
    report = audit_dynamic_shapes(
        artifact.stage_programs[GROUND], stage_dims(count, boxes=True)[GROUND], names
    )
    assert report.ranges == {"batch": (1, inf), "num_prompts": (1, inf), "num_boxes": (1, inf)}
    for batch, prompts, slots in [(2, 1, 3), (1, 2, 1)]:
        inputs = example_inputs(tiny_wrapper, batch, prompts, seed=9, boxes=slots)
        features = artifact.encode_images(inputs[0])
        assert_bitwise(artifact(*inputs), artifact.ground(features, *inputs[1:]))
        assert_bitwise(artifact(*inputs[:2]), artifact.ground(features, inputs[1]))  # padding


def test_bf16_stages_compose_bitwise(tiny_model, tiny_bf16_ep, tiny_wrapper, tmp_path) -> None:
    stages = export_stages(tiny_model, autocast_dtype=torch.bfloat16)
    assert {f.dtype for f in stages.info.features} == {"bfloat16"}
    path = tmp_path / "bf16-staged.pt2"
    save_pipeline(tiny_bf16_ep, path, stages=stages)
    artifact = load_artifact(path)
    for batch, prompts in [(2, 1), (1, 2)]:
        images, tokens = example_inputs(tiny_wrapper, batch, prompts, seed=5)
        assert_bitwise(
            tiny_bf16_ep.module()(images, tokens), artifact.ground(artifact.encode_images(images), tokens)
        )


def test_stage_inputs_are_checked(staged, tiny_artifact, tiny_wrapper) -> None:
    artifact = load_artifact(staged)
    images, tokens = example_inputs(tiny_wrapper, 1, 1)
    features = artifact.encode_images(images)
    with pytest.raises(InputSpecError, match=r"^features: expected 4 arrays \(backbone_fpn_0, .*got 3"):
        artifact.ground(features[:3], tokens)
    with pytest.raises(
        InputSpecError, match=r"^features.backbone_fpn_1: expected shape \['batch', 64, 32, 32\]"
    ):
        artifact.ground((features[0], features[0], features[2], features[3]), tokens)
    with pytest.raises(InputSpecError, match=r"^features.vision_pos_enc_2: expected batch 1 .*got 2"):
        artifact.ground((*features[:3], torch.cat([features[3]] * 2)), tokens)
    with pytest.raises(
        InputSpecError, match=r"^features.backbone_fpn_0: expected dtype float32, got float64"
    ):
        artifact.ground((features[0].double(), *features[1:]), tokens)
    with pytest.raises(InputSpecError, match=r"^token_ids: expected shape"):
        artifact.ground(features, tokens[:, :3])
    with pytest.raises(InputSpecError, match=r"^boxes: expected no boxes for the text-only artifact"):
        artifact.ground(features, tokens, boxes=np.zeros((1, 1, 1, 4), np.float32))
    with pytest.raises(InputSpecError, match=r"^images: expected shape"):
        artifact.encode_images(images[:, :2])
    one = load_artifact(tiny_artifact)
    assert not one.has_stages
    with pytest.raises(
        InputSpecError, match=r"^encode_images: expected an artifact with stages \(export --stages\)"
    ):
        one.encode_images(images)


def test_stages_are_refused_for_other_kinds(tiny_model, tmp_path) -> None:
    with pytest.raises(InputSpecError, match=r"^stages: expected the pt2 kind alone"):
        build_artifact(tmp_path / "x.onnx", model=tiny_model, formats=["onnx"], staged=True)
    status, _, err = run_cli(
        [
            "export",
            "--size",
            "tiny",
            "--random-weights",
            "--stages",
            "--malloc",
            "default",
            "--format",
            "onnx",
            "--out",
            str(tmp_path / "y.onnx"),
        ]
    )
    assert status == 2 and err.count("\n") == 1 and "stages: expected the pt2 kind alone" in err
    assert not list(tmp_path.iterdir())


def test_a_manifest_with_bad_stages_is_refused(staged) -> None:
    doc = json.loads(Path(f"{staged}.json").read_text())
    doc["stages"]["features"][0]["shape"] = [1, 64, 64, 64]
    with pytest.raises(ArtifactError, match=r"stages.features\[0\].shape: expected \['batch', int, ...\]"):
        Manifest.from_json(doc)
    doc["stages"] = {"features": [], "audits": {}}
    with pytest.raises(ArtifactError, match=r"stages.features: expected at least one feature"):
        Manifest.from_json(doc)
    good = StagesInfo.from_json(json.loads(Path(f"{staged}.json").read_text())["stages"], "stages")
    assert StagesInfo.from_json(good.to_json(), "stages") == good


# -- the Predictor's feature cache -----------------------------------------------------------


def _images() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (90, 120, 3), dtype=np.uint8)) for _ in range(2)]


#: (image, phrases) asked in turn: repeats of both images, new and repeated phrases.
SEQUENCE = [
    (0, ["a cat"]),
    (1, ["a dog", "a cat"]),
    (0, ["a tree", "a car", "a cat"]),
    (1, ["a dog"]),
    (0, ["a cat"]),
]


def _assert_same_pairs(got, expected) -> None:
    assert len(got) == len(expected)
    for a, b in zip(got, expected, strict=True):
        assert torch.equal(a.scores, b.scores) and torch.equal(a.boxes, b.boxes)
        assert torch.equal(a.low_masks, b.low_masks)


def test_a_cached_predictor_equals_the_uncached_one_bitwise(staged, tiny_artifact) -> None:
    images = _images()
    cached = Predictor(staged)
    uncached = Predictor(tiny_artifact, cache_bytes=0)
    for i, phrases in SEQUENCE:
        got = cached.kept_pairs([images[i]], phrases, threshold=0.0)
        _assert_same_pairs(got[0], uncached.kept_pairs([images[i]], phrases, threshold=0.0)[0])
    assert (cached.cache.misses, cached.cache.hits, len(cached.cache)) == (2, 3, 2)
    both = cached.kept_pairs(images, ["a cat", "a dog"], threshold=0.0)  # a new batch: one more entry
    expected = uncached.kept_pairs(images, ["a cat", "a dog"], threshold=0.0)
    for row, ref in zip(both, expected, strict=True):
        _assert_same_pairs(row, ref)
    assert (cached.cache.misses, len(cached.cache)) == (3, 3)


def test_encoding_images_alone_caches_each_by_its_own_pixels(staged, tiny_artifact) -> None:
    """``encode_alone`` (the server's): a two-image call encodes and caches each image by
    itself and grounds both at once; a later call of one of them hits, bitwise the uncached
    one-image call."""
    from sam3_exportable.predict.processing import concat_batch, run_encode, run_ground

    images = _images()
    alone = Predictor(staged, encode_alone=True)
    both = alone.kept_pairs(images, ["a cat", "a dog"], threshold=0.0)
    assert (alone.cache.misses, alone.cache.hits, len(alone.cache)) == (2, 0, 2)
    pixels = alone.preprocess(images)
    artifact = alone.artifact
    features = concat_batch([run_encode(artifact, pixels[i : i + 1]) for i in range(2)], "torch")
    outputs = run_ground(artifact, features, alone.tokenize(["a cat", "a dog"]))
    for i, (row, image) in enumerate(zip(both, images, strict=True)):
        expected = [
            keep_pair(*(out[k : k + 1] for out in outputs), height=90, width=120, threshold=0.0)
            for k in (2 * i, 2 * i + 1)
        ]
        assert image.size == (120, 90)
        _assert_same_pairs(row, expected)
    single = alone.kept_pairs([images[1]], ["a bird"], threshold=0.0)
    assert (alone.cache.hits, len(alone.cache)) == (1, 2)
    uncached = Predictor(tiny_artifact, cache_bytes=0).kept_pairs([images[1]], ["a bird"], threshold=0.0)
    _assert_same_pairs(single[0], uncached[0])


def test_a_cache_smaller_than_one_image_still_works(staged, tiny_artifact) -> None:
    images = _images()
    small = Predictor(staged, cache_bytes=1000)
    chunked = Predictor(tiny_artifact, cache_bytes=0)
    for i, phrases in SEQUENCE[:3]:
        got = small.kept_pairs([images[i]], phrases, threshold=0.0, max_pairs=2)
        _assert_same_pairs(got[0], chunked.kept_pairs([images[i]], phrases, threshold=0.0, max_pairs=2)[0])
    assert (len(small.cache), small.cache.bytes, small.cache.hits) == (0, 0, 0)


def test_the_feature_cache_drops_the_least_recently_used() -> None:
    cache = FeatureCache(max_bytes=100)
    a, b, c = (np.zeros(10, np.float32) for _ in range(3))  # 40 bytes each
    assert cache.put("a", [a]) and cache.put("b", [b])
    assert cache.get("a") is not None  # "a" is now the most recent
    assert cache.put("c", [c])  # 120 > 100: drops "b", the least recently used
    assert cache.get("b") is None and cache.get("a") is not None and cache.get("c") is not None
    assert (len(cache), cache.bytes, cache.hits, cache.misses) == (2, 80, 3, 1)
    assert not cache.put("big", [np.zeros(30, np.float32)])  # 120 bytes: never kept
    assert len(cache) == 2
    cache.clear()
    assert (len(cache), cache.bytes) == (0, 0)
    for bad in (-1, 1.5, True):
        with pytest.raises(InputSpecError, match=r"^cache_bytes: expected a byte count >= 0"):
            FeatureCache(bad)  # type: ignore[arg-type]


def test_the_pixels_key_tells_images_apart() -> None:
    x = np.zeros((1, 3, 4, 4), np.float32)
    y = x.copy()
    y[0, 0, 0, 0] = 1
    assert pixels_key(x) == pixels_key(x.copy()) == pixels_key(torch.from_numpy(x))
    assert (
        len(
            {
                pixels_key(x),
                pixels_key(y),
                pixels_key(x.reshape(1, 3, 2, 8)),
                pixels_key(x.astype(np.float64)),
            }
        )
        == 4
    )
