"""Predictor and `sam3-exportable predict`: upstream parity, outputs, bad inputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from sam3.model.sam3_image_processor import Sam3Processor

import sam3_exportable as s3e
from sam3_exportable.artifact import manifest_path
from sam3_exportable.cli import main
from sam3_exportable.predict import Predictor, load_image

PHRASES = ["a dog", "a red car", "the tallest building in the picture"]
THRESHOLD = 0.2  # random tiny weights score about 0.25: keeps instances on both sides

# Measured bounds for one batched call (B images x P phrases) against upstream's one-pair
# calls (tiny model, torch 2.14.1 CPU): scores 1.2e-7, boxes 0, mask probabilities 6e-7.
SCORE_BOUND = 1e-6
MASK_PROB_BOUND = 1e-5
BOX_BOUND_PX = 1e-3


def _image(seed: int, height: int, width: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def images() -> list[Image.Image]:
    return [_image(0, 200, 320), _image(1, 260, 150)]  # landscape and portrait


@pytest.fixture(scope="module")
def predictor(tiny_ep) -> Predictor:
    return Predictor(tiny_ep)


def _upstream(model, image, phrase, threshold=THRESHOLD):
    with s3e.exportable_sam3():
        processor = Sam3Processor(model, resolution=224, device="cpu", confidence_threshold=threshold)
        state = processor.set_image(image)
        return processor.set_text_prompt(phrase, state)


def test_one_pair_calls_are_bitwise_upstream(tiny_model, predictor, images) -> None:
    kept = 0
    for image in images:
        for phrase in PHRASES:
            ours = predictor.predict([image], [phrase], threshold=THRESHOLD)[0][0]
            ref = _upstream(tiny_model, image, phrase)
            kept += len(ours.scores)
            assert torch.equal(ours.scores, ref["scores"])
            assert torch.equal(ours.boxes, ref["boxes"])
            assert torch.equal(ours.masks_logits, ref["masks_logits"])
            assert torch.equal(ours.masks, ref["masks"])
            assert ours.masks.shape[-2:] == (image.height, image.width)
    assert kept > 0


def test_batched_call_matches_upstream_within_measured_bounds(tiny_model, predictor, images) -> None:
    # Not bitwise: B*P pairs go through matmuls with B*P rows (and the segmentation head's
    # batch > 1 branch), whose CPU kernels round differently from upstream's one-pair calls.
    results = predictor.predict(images, PHRASES, threshold=THRESHOLD)
    worst = {"score": 0.0, "box": 0.0, "prob": 0.0}
    for i, image in enumerate(images):
        for j, phrase in enumerate(PHRASES):
            ours, ref = results[i][j], _upstream(tiny_model, image, phrase)
            assert ours.scores.shape == ref["scores"].shape
            worst["score"] = max(worst["score"], float((ours.scores - ref["scores"]).abs().max()))
            worst["box"] = max(worst["box"], float((ours.boxes - ref["boxes"]).abs().max()))
            prob_diff = (ours.masks_logits - ref["masks_logits"]).abs()
            worst["prob"] = max(worst["prob"], float(prob_diff.max()))
            flips = ours.masks != ref["masks"]
            assert ((ref["masks_logits"][flips] - 0.5).abs() <= MASK_PROB_BOUND).all()
    print("batched vs upstream max |diff|:", worst)
    assert worst["score"] <= SCORE_BOUND
    assert worst["box"] <= BOX_BOUND_PX
    assert worst["prob"] <= MASK_PROB_BOUND


def test_load_image_modes(tmp_path: Path) -> None:
    rgb = _image(2, 30, 40)
    rgb.convert("L").save(tmp_path / "gray.png")
    rgba = rgb.copy()
    rgba.putalpha(128)
    rgba.save(tmp_path / "rgba.png")
    sixteen = np.arange(30 * 40, dtype=np.uint16).reshape(30, 40) * 50
    Image.fromarray(sixteen).save(tmp_path / "deep.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    rgb.save(tmp_path / "rotated.jpg", exif=exif)

    gray = load_image(tmp_path / "gray.png")
    assert gray.mode == "RGB" and np.array_equal(np.asarray(gray)[..., 0], np.asarray(rgb.convert("L")))
    assert load_image(tmp_path / "rgba.png").tobytes() == rgb.tobytes()
    deep = np.asarray(load_image(tmp_path / "deep.png"))[..., 0]
    assert np.array_equal(deep, np.clip(np.rint(sixteen / 257.0), 0, 255).astype(np.uint8))
    assert load_image(tmp_path / "rotated.jpg").size == (30, 40)


def test_long_phrase_warns_about_truncation(predictor) -> None:
    with pytest.warns(UserWarning, match="truncated to the artifact's context length 32"):
        tokens = predictor.tokenize(["dog " * 40])
    assert tokens.shape == (1, 32)


@pytest.fixture(scope="module")
def artifact(tiny_artifact) -> Path:
    return tiny_artifact


@pytest.fixture(scope="module")
def image_files(images, tmp_path_factory) -> list[Path]:
    folder = tmp_path_factory.mktemp("images")
    paths = [folder / "landscape.jpg", folder / "portrait.png"]
    images[0].save(paths[0], quality=95)
    images[1].save(paths[1])
    return paths


def _predict_args(artifact: Path, images: list[Path], out: Path, phrases=PHRASES, *extra: str) -> list[str]:
    args = ["predict", "--model", str(artifact), "--out", str(out), "--threshold", str(THRESHOLD)]
    args += ["--malloc", "default"]  # keep this test process's malloc as it is
    for image in images:
        args += ["--image", str(image)]
    for phrase in phrases:
        args += ["--prompt", phrase]
    return args + list(extra)


def test_cli_predict_writes_results_masks_and_overlays(
    artifact, image_files, predictor, tmp_path: Path, capsys
) -> None:
    out = tmp_path / "out"
    assert main(_predict_args(artifact, image_files, out)) == 0
    printed = capsys.readouterr().out
    assert "segmented 2 of 2 images" in printed and f"results: {out / 'results.jsonl'}" in printed
    assert json.loads((out / "run.json").read_text())["phrases"] == PHRASES
    lines = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert sorted(entry["path"] for entry in lines) == sorted(str(p.resolve()) for p in image_files)
    assert len(list((out / "overlays").iterdir())) == 2
    assert len(list((out / "masks").iterdir())) == 2 * len(PHRASES)
    total = 0
    for entry in lines:
        # one image per call with all phrases: bitwise the Predictor's results on that image
        expected = predictor.predict([load_image(entry["path"])], PHRASES, threshold=THRESHOLD)[0]
        with Image.open(out / entry["overlay"]) as overlay:
            assert overlay.size == Image.open(entry["path"]).size and overlay.mode == "RGB"
        for phrase, ref in zip(entry["phrases"], expected, strict=True):
            labels = np.asarray(Image.open(out / phrase["mask_png"]))
            assert labels.shape == (entry["height"], entry["width"])
            assert [inst["score"] for inst in phrase["instances"]] == ref.scores.tolist()
            assert [inst["box_xyxy"] for inst in phrase["instances"]] == ref.boxes.tolist()
            for k, inst in enumerate(phrase["instances"]):
                total += 1
                rle = {"size": inst["rle"]["size"], "counts": inst["rle"]["counts"].encode()}
                decoded = mask_utils.decode(rle).astype(bool)
                assert np.array_equal(decoded, ref.masks[k, 0].numpy())
                assert decoded.sum() == inst["area"]
                assert ((labels == k + 1) <= decoded).all()  # later instances may overlap it
    assert total > 0
    # --force replaces a complete previous output
    assert main(_predict_args(artifact, image_files[:1], out, ["a cat"], "--force")) == 0
    assert json.loads((out / "run.json").read_text())["phrases"] == ["a cat"]
    assert len((out / "results.jsonl").read_text().splitlines()) == 1
    assert len(list((out / "masks").iterdir())) == 1


def _assert_refused(args: list[str], out: Path, message: str, capsys) -> None:
    assert main(args) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")]


def test_bad_inputs_are_refused_and_nothing_is_written(artifact, image_files, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    _assert_refused(_predict_args(artifact, [tmp_path / "missing.jpg"], out), out, "no such path", capsys)
    _assert_refused(
        _predict_args(artifact, image_files, out, ["a dog", "  "]), out, "non-empty phrase", capsys
    )
    _assert_refused(_predict_args(artifact, image_files, out, []), out, "at least one text prompt", capsys)
    foreign = tmp_path / "foreign.pt2"
    torch.export.save(torch.export.load(artifact), foreign)  # a program without our manifest
    _assert_refused(_predict_args(foreign, image_files, out), out, "not a sam3-exportable artifact", capsys)
    foreign.write_bytes(artifact.read_bytes())
    manifest_path(foreign).write_text(manifest_path(artifact).read_text())
    with foreign.open("ab") as fh:
        fh.write(b"tampered")
    _assert_refused(_predict_args(foreign, image_files, out), out, "size mismatch", capsys)
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    for extra in ((), ("--force",)):
        assert main(_predict_args(artifact, image_files, out, PHRASES, *extra)) == 2
        assert "no run.json, so it is left alone" in capsys.readouterr().err
        assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]


def test_an_unreadable_image_fails_alone(artifact, image_files, tmp_path: Path, capsys) -> None:
    (tmp_path / "text.jpg").write_text("not an image")
    out = tmp_path / "out"
    assert main(_predict_args(artifact, [tmp_path / "text.jpg", *image_files], out)) == 1
    err = capsys.readouterr().err
    assert "expected a readable image file" in err and "1 of 3 images failed" in err
    assert len((out / "results.jsonl").read_text().splitlines()) == 2
    assert json.loads((out / "errors.jsonl").read_text())["path"] == str(tmp_path / "text.jpg")
