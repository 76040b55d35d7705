"""Images and phrases: one conversion path, so the same picture gives the same numbers
however it comes; values that cannot be converted are refused by name."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sam3_exportable.errors import ImageTooLargeError, InputSpecError
from sam3_exportable.predict import Predictor, load_image, to_rgb
from sam3_exportable.tokenizer import Tokenizer


def _rgb(img: Image.Image) -> np.ndarray:
    assert img.mode == "RGB"
    return np.asarray(img)


@pytest.fixture(scope="module")
def predictor(tiny_ep) -> Predictor:
    return Predictor(tiny_ep)


@pytest.fixture(scope="module")
def picture() -> np.ndarray:
    rng = np.random.default_rng(3)
    return rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)


def test_the_same_picture_in_every_form_gives_the_same_pixels_and_inputs(
    predictor, picture, tmp_path
) -> None:
    Image.fromarray(picture).save(tmp_path / "p.png")
    forms = {
        "path": tmp_path / "p.png",
        "str": str(tmp_path / "p.png"),
        "pil (lazy, from the file)": Image.open(tmp_path / "p.png"),
        "pil": Image.fromarray(picture),
        "numpy HWC": picture,
        "numpy HWC float [0, 1]": picture.astype(np.float32) / 255.0,
        "numpy RGBA": np.concatenate([picture, np.full((37, 53, 1), 7, np.uint8)], axis=2),
        "tensor CHW": torch.from_numpy(picture).permute(2, 0, 1),
        "tensor CHW float [0, 1]": torch.from_numpy(picture).permute(2, 0, 1).float() / 255.0,
    }
    reference = predictor.preprocess([picture])
    for name, form in forms.items():
        assert np.array_equal(_rgb(to_rgb(form)), picture), name
        assert torch.equal(predictor.preprocess([form]), reference), name


def test_sixteen_bit_images_by_path_and_as_pil_objects(predictor, tmp_path) -> None:
    deep = (np.arange(30 * 40, dtype=np.uint16).reshape(30, 40) * 50).astype(np.uint16)
    Image.fromarray(deep).save(tmp_path / "deep.png")
    as_pil = Image.open(tmp_path / "deep.png")
    assert as_pil.mode.startswith("I;16")
    expected = np.clip(np.rint(deep / 257.0), 0, 255).astype(np.uint8)
    for form in (tmp_path / "deep.png", as_pil, deep):
        gray = _rgb(to_rgb(form))[..., 0]
        assert np.array_equal(gray, expected)
    inputs = predictor.preprocess([Image.open(tmp_path / "deep.png")])
    assert inputs.std() > 0.1  # 0.1 saw an all -1 tensor for a 16-bit PIL image


def test_palette_images_give_the_same_scores_as_pil_object_and_by_path(predictor, picture, tmp_path) -> None:
    Image.fromarray(picture).convert("P", palette=Image.Palette.ADAPTIVE).save(tmp_path / "pal.png")
    by_path = predictor.run([tmp_path / "pal.png"], ["a dog"])
    by_object = predictor.run([Image.open(tmp_path / "pal.png")], ["a dog"])
    for a, b in zip(by_path, by_object, strict=True):
        assert torch.equal(a, b)


def test_float_tiffs_in_0_1_are_scaled_not_black(tmp_path) -> None:
    values = np.linspace(0.0, 1.0, 30 * 40, dtype=np.float32).reshape(30, 40)
    Image.fromarray(values, mode="F").save(tmp_path / "f.tif")
    gray = _rgb(load_image(tmp_path / "f.tif"))[..., 0]
    assert np.array_equal(gray, np.rint(values.astype(np.float64) * 255).astype(np.uint8))
    assert gray.max() == 255


def test_32_bit_integer_tiffs_in_16_bit_range_are_scaled_not_saturated(tmp_path) -> None:
    values = (np.arange(30 * 40, dtype=np.int32).reshape(30, 40) * 54).astype(np.int32)  # up to 64746
    Image.fromarray(values, mode="I").save(tmp_path / "i.tif")
    gray = _rgb(load_image(tmp_path / "i.tif"))[..., 0]
    assert np.array_equal(gray, np.clip(np.rint(values / 257.0), 0, 255).astype(np.uint8))
    assert (gray == 255).mean() < 0.01  # 0.1 saturated 94% of the pixels
    wide = values.astype(np.int64) * 1000
    with pytest.raises(InputSpecError, match=r"expected 8- or 16-bit pixel values.*rescale it first"):
        to_rgb(wide)


@pytest.mark.parametrize(
    ("array", "message"),
    [
        (
            np.full((4, 4), 300.0, np.float32),
            r"expected float pixels in \[0, 1\] \(or \[0, 255\]\), got \[300",
        ),
        (np.full((4, 4), np.nan, np.float32), "expected finite pixel values"),
        (np.full((4, 4), -1, np.int16), "expected non-negative integer pixels"),
        (np.zeros((4, 4), bool), "got a boolean mask"),
        (np.zeros((4, 4, 2), np.uint8), r"expected an array \[H, W\] or \[H, W, C\] with C in 1, 3, 4"),
        (np.zeros((0, 4, 3), np.uint8), "got an empty image"),
        ("not/a/file.png", "no such file"),
        (12, "expected a file path, file bytes, a PIL image, a numpy array"),
    ],
)
def test_unconvertible_images_are_refused_by_name(array, message) -> None:
    with pytest.raises((InputSpecError, FileNotFoundError), match=message):
        to_rgb(array)


def _png_header_only(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 16))
        + chunk(b"IEND", b"")
    )


def test_a_decompression_bomb_is_a_named_input_error(tmp_path: Path) -> None:
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(_png_header_only(100_000, 100_000))
    with pytest.raises(
        ImageTooLargeError, match=r"bomb.png: expected at most .* pixels \(--max-pixels\), got 100000x100000"
    ):
        load_image(bomb)
    small = tmp_path / "small.png"
    Image.new("RGB", (300, 200)).save(small)
    with pytest.raises(ImageTooLargeError, match=r"at most 1,000 pixels"):
        load_image(small, max_pixels=1000)
    with pytest.raises(ImageTooLargeError, match=r"at most 1,000 pixels"):
        to_rgb(Image.new("RGB", (300, 200)), max_pixels=1000)
    with pytest.raises(InputSpecError) as broken:  # not an image: an input error, not a size one
        to_rgb(b"no image here", max_pixels=1000)
    assert not isinstance(broken.value, ImageTooLargeError)


def test_exif_orientation_is_applied_to_paths_and_pil_objects_alike(picture, tmp_path) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    Image.fromarray(picture).save(tmp_path / "r.jpg", exif=exif, quality=95)
    by_path, by_object = to_rgb(tmp_path / "r.jpg"), to_rgb(Image.open(tmp_path / "r.jpg"))
    assert by_path.size == (37, 53) and np.array_equal(_rgb(by_path), _rgb(by_object))


@pytest.mark.parametrize("phrase", ["\x01\x02\x03", "\x00", "\x1b[0m"])
def test_a_phrase_with_no_word_is_refused(phrase: str) -> None:
    with pytest.raises(InputSpecError, match=r"phrases\[1\]: expected a phrase with at least one word"):
        Tokenizer(32)(["a dog", phrase])


# -- through the command line -------------------------------------------------------------

_PEAK_OF_CHILD = (
    "import resource, subprocess, sys; "
    "status = subprocess.run(sys.argv[1:], capture_output=True).returncode; "
    "print(status, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
)


def _predict_peak(artifact: Path, image: Path, out: Path) -> tuple[int, int]:
    """(exit status, peak RSS in bytes) of `predict` on one image with nothing kept."""
    import subprocess
    import sys

    command = [sys.executable, "-m", "sam3_exportable.cli", "predict", "--model", str(artifact)]
    command += ["--image", str(image), "--prompt", "a dog", "--threshold", "1.0", "--out", str(out)]
    command += ["--malloc", "default"]  # live memory: "retain" keeps what was freed, by design
    run = subprocess.run(
        [sys.executable, "-c", _PEAK_OF_CHILD, *command], capture_output=True, text=True, timeout=600
    )
    status, peak_kib = run.stdout.split()
    return int(status), int(peak_kib) * 1024


def test_a_huge_image_costs_little_more_memory_than_a_small_one(tiny_artifact, tmp_path: Path) -> None:
    """Pre- and post-processing hold one copy of the pixels beside the decoded image, and at
    most one mask at the image's size: a 12000x12000 image with no instance kept stays within
    1 GiB of the same run on a 1000x1000 image (overlay and mask PNGs written)."""
    peaks = {}
    for side in (1000, 12000):
        image = tmp_path / f"{side}.png"
        Image.new("RGB", (side, side), (120, 80, 40)).save(image)
        status, peaks[side] = _predict_peak(tiny_artifact, image, tmp_path / f"out-{side}")
        assert status == 0
    assert peaks[12000] - peaks[1000] <= 2**30, {k: v / 2**30 for k, v in peaks.items()}


def test_predict_reports_a_decompression_bomb_by_path_and_goes_on(
    tiny_artifact, tmp_path: Path, capsys
) -> None:
    from sam3_exportable.cli import main

    bomb, fine = tmp_path / "bomb.png", tmp_path / "fine.png"
    bomb.write_bytes(_png_header_only(100_000, 100_000))
    Image.new("RGB", (64, 48)).save(fine)
    out = tmp_path / "out"
    args = ["predict", "--model", str(tiny_artifact), "--image", str(bomb), "--image", str(fine)]
    assert main([*args, "--prompt", "a dog", "--out", str(out), "--malloc", "default"]) == 1
    err = capsys.readouterr().err
    assert f"skipped image {bomb}: expected at most" in err and "got 100000x100000" in err
    assert "Traceback" not in err
    (line,) = (out / "errors.jsonl").read_text().splitlines()
    assert "--max-pixels" in line
    assert len((out / "results.jsonl").read_text().splitlines()) == 1
