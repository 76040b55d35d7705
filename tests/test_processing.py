"""Pre- and post-processing: numpy (ONNX, the runtime install) against torch (upstream's
kernels) on the same artifact.

The bounds the README states: the resized and normalised pixels are equal; on the same graph
outputs the kept instances are identical, scores within 1e-6, boxes within 1e-3 px, and a
mask pixel differs only where torch's probability is within 1e-5 of the 0.5 threshold.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from sam3_exportable.predict import Predictor
from sam3_exportable.predict.predictor import KeptPair, PairResult, keep_pair
from sam3_exportable.predict.processing import preprocess, resize_uint8

SCORE_BOUND = 1e-6
BOX_BOUND_PX = 1e-3
MASK_PROB_BOUND = 1e-5


def _images(seed: int, sizes) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    images = []
    for h, w in sizes:
        smooth = rng.integers(0, 255, (h // 8 + 2, w // 8 + 2, 3), dtype=np.uint8)
        base = np.asarray(Image.fromarray(smooth).resize((w, h), Image.Resampling.BICUBIC))
        noise = rng.integers(-20, 20, (h, w, 3))
        images.append(Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8)))
    return images


@pytest.mark.parametrize("size", [64, 224, 1008])
def test_the_8_bit_resize_is_torchvisions(size: int) -> None:
    from torchvision.transforms import v2

    resize = v2.Resize(size=(size, size))
    rng = np.random.default_rng(size)
    shapes = [(size, size), (1, 1), (size + 1, size - 1), (3, 2000), (2000, 3), (777, 1234)]
    shapes += [tuple(int(v) for v in rng.integers(2, 2500, 2)) for _ in range(6)]
    for h, w in shapes:
        pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        want = resize(torch.from_numpy(pixels).permute(2, 0, 1)).permute(1, 2, 0).numpy()
        assert np.array_equal(resize_uint8(pixels, size), want), (h, w)


def test_numpy_preprocessing_equals_upstreams_transform() -> None:
    images = _images(1, [(90, 130), (224, 224), (500, 311), (40, 41)])
    ours = preprocess(images, 224, "numpy")
    upstream = preprocess(images, 224, "torch")
    assert isinstance(ours, np.ndarray) and ours.dtype == np.float32
    assert np.array_equal(ours, upstream.numpy())


def _compare(ours: PairResult, ref: PairResult, stats: dict[str, float]) -> None:
    """Assert the bounds between a numpy result and a torch one; record the largest diffs."""
    assert ours.scores.shape == tuple(ref.scores.shape)  # the same kept queries
    if not len(ours.scores):
        return
    flips = ours.masks != ref.masks.numpy()
    near = np.abs(ref.masks_logits.numpy() - 0.5) <= MASK_PROB_BOUND
    assert not (flips & ~near).any(), "a mask pixel differs away from the threshold"
    diffs = {
        "score": np.abs(ours.scores - ref.scores.numpy()).max(),
        "box_px": np.abs(ours.boxes - ref.boxes.numpy()).max(),
        "mask_prob": np.abs(ours.masks_logits - ref.masks_logits.numpy()).max(),
    }
    for key, value in diffs.items():
        stats[key] = max(stats.get(key, 0.0), float(value))
    stats["mask_flips"] = stats.get("mask_flips", 0) + int(flips.sum())


def _check_pair(np_pair: KeptPair, torch_pair: KeptPair, stats: dict[str, float]) -> None:
    assert isinstance(np_pair.scores, np.ndarray) and isinstance(torch_pair.scores, torch.Tensor)
    _compare(PairResult.of(np_pair), PairResult.of(torch_pair), stats)


def test_postprocessing_numpy_against_torch_on_the_same_outputs(onnx_pair) -> None:
    predictor = Predictor(onnx_pair[0], threads=2)
    images = _images(2, [(90, 130), (300, 200), (37, 640)])
    phrases = ["a dog", "a red car", "trees"]
    outputs = predictor.run(images, phrases)  # numpy in, numpy out
    as_torch = [torch.from_numpy(o) for o in outputs]
    stats: dict[str, float] = {}
    for threshold in (0.0, 0.05, 0.5):
        for i, img in enumerate(images):
            for j in range(len(phrases)):
                k = i * len(phrases) + j
                kw = {"height": img.height, "width": img.width, "threshold": threshold}
                np_pair = keep_pair(*(o[k : k + 1] for o in outputs), **kw)
                torch_pair = keep_pair(*(o[k : k + 1] for o in as_torch), **kw)
                _check_pair(np_pair, torch_pair, stats)
    assert stats["score"] <= SCORE_BOUND and stats["box_px"] <= BOX_BOUND_PX, stats
    print(f"numpy vs torch post-processing: {stats}")


def test_the_onnx_predictor_end_to_end_against_the_torch_path(onnx_pair) -> None:
    predictor = Predictor(onnx_pair[0], threads=2)
    images = _images(3, [(120, 90), (64, 200)])
    phrases = ["a dog", "a cat"]
    stats: dict[str, float] = {}
    for threshold in (0.02, 0.5):
        ours = predictor.predict(images, phrases, threshold=threshold)
        # the torch path on the same artifact: torchvision's transform, torch tensors through
        # the graph, torch's kernels after it
        pixels = preprocess(predictor.load(images), predictor.image_size, "torch")
        outputs = predictor.artifact(pixels, torch.from_numpy(predictor.tokenize(phrases)))
        assert isinstance(outputs[0], torch.Tensor)
        for i, img in enumerate(images):
            for j in range(len(phrases)):
                k = i * len(phrases) + j
                rows = (o[k : k + 1] for o in outputs)
                ref = PairResult.of(keep_pair(*rows, height=img.height, width=img.width, threshold=threshold))
                assert isinstance(ours[i][j].scores, np.ndarray)
                _compare(ours[i][j], ref, stats)
    assert stats.get("score", 0.0) <= SCORE_BOUND and stats.get("box_px", 0.0) <= BOX_BOUND_PX, stats
    print(f"ONNX predictor, numpy path vs torch path: {stats}")
