"""Batch jobs (`predict` over folders, `segment_images`, `SegmentBatch`): inputs, outputs,
failures, resume after a kill, the Ray engine and a Ray cluster, refusals."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_cli
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from sam3_exportable.artifact.files import current_umask
from sam3_exportable.batch import SegmentBatch, expand_images, segment_images
from sam3_exportable.batch.progress import Progress
from sam3_exportable.errors import InputSpecError
from sam3_exportable.predict import KeptPair
from sam3_exportable.predict.outputs import encode_image

ROOT = Path(__file__).resolve().parents[1]
PHRASES = ["a dog", "a cat"]
THRESHOLD = 0.2  # random tiny weights score about 0.25: keeps instances on both sides
#: batch size and pairs per call of the reference run: three images, one phrase per call
BATCH, PAIRS = 3, 3
#: scores of one image across batch compositions and phrase chunks (tiny model, CPU)
SCORE_BOUND = 1e-5


def _rgb(seed: int, height: int, width: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def artifact(tiny_artifact) -> Path:
    return tiny_artifact


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """Eight images of different sizes, formats and modes (two in sub-directories), one
    corrupt file, and files a directory search leaves out (a text file, a hidden image)."""
    root = tmp_path_factory.mktemp("photos")
    (root / "a").mkdir()
    (root / "b" / "c").mkdir(parents=True)
    Image.fromarray(_rgb(0, 120, 160)).save(root / "a" / "landscape.jpg", quality=92)
    Image.fromarray(_rgb(1, 150, 90)).save(root / "a" / "portrait.PNG")
    Image.fromarray(_rgb(2, 48, 32)).save(root / "b" / "c" / "tiny.tif")
    Image.fromarray(_rgb(3, 80, 100)[..., 0]).save(root / "gray.png")
    Image.fromarray(np.dstack([_rgb(4, 110, 70), np.full((110, 70), 128, np.uint8)])).save(root / "rgba.png")
    deep = (np.random.default_rng(5).integers(0, 65535, (64, 80))).astype(np.uint16)
    Image.fromarray(deep).save(root / "deep.png")
    Image.fromarray(_rgb(6, 64, 64)).convert("P").save(root / "palette.gif")
    Image.fromarray(_rgb(7, 50, 200)).save(root / "wide.bmp")
    (root / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a JPEG")
    (root / "notes.txt").write_text("not an image")
    Image.fromarray(_rgb(8, 20, 20)).save(root / ".hidden.jpg")
    return root


def _args(artifact: Path, out: Path, *extra: str, images: tuple[str, ...] = ()) -> list[str]:
    args = ["predict", "--model", str(artifact), "--out", str(out), "--threshold", str(THRESHOLD)]
    args += ["--malloc", "default", "--threads", "1"]  # this process's malloc stays as it is
    for phrase in PHRASES:
        args += ["--prompt", phrase]
    for image in images:
        args += ["--image", image]
    return args + list(extra)


@pytest.fixture(scope="module")
def reference(artifact, photos, tmp_path_factory) -> tuple[Path, int, str]:
    """The folder through the command line, local engine, 3 images per call, 3 pairs per
    call (so one phrase per call): (out, exit status, stderr)."""
    out = tmp_path_factory.mktemp("runs") / "reference"
    status, _, err = run_cli(
        _args(artifact, out, "--batch-size", str(BATCH), "--max-pairs", str(PAIRS), images=(str(photos),))
    )
    return out, status, err


def _results(out: Path) -> dict[str, dict]:
    lines = (out / "results.jsonl").read_text().splitlines()
    return {json.loads(line)["path"]: json.loads(line) for line in lines}


def _files(out: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(out)): p.read_bytes()
        for folder in ("masks", "overlays")
        if (out / folder).is_dir()
        for p in sorted((out / folder).iterdir())
    }


def assert_same_outputs(expected: Path, got: Path) -> None:
    """results.jsonl (modulo line order), errors.jsonl, coco.json and every PNG, bytewise."""
    assert sorted((expected / "results.jsonl").read_text().splitlines()) == sorted(
        (got / "results.jsonl").read_text().splitlines()
    )
    for name in ("coco.json", "errors.jsonl"):
        assert (expected / name).is_file() == (got / name).is_file(), name
        if (expected / name).is_file():
            assert (expected / name).read_bytes() == (got / name).read_bytes(), name
    want, have = _files(expected), _files(got)
    assert sorted(want) == sorted(have)
    assert [name for name in want if want[name] != have[name]] == []


def _leftovers(out: Path) -> list[str]:
    return [str(p) for p in out.rglob(".*") if p.name.endswith(".tmp")]


# -- inputs ---------------------------------------------------------------------------------


def test_literal_paths_first_empty_refused_and_one_symlink_rule(tmp_path: Path) -> None:
    from PIL import Image

    for name in ("photo[1].png", "photo1.png"):
        Image.new("RGB", (8, 8)).save(tmp_path / name)
    assert expand_images([tmp_path / "photo[1].png"]) == [tmp_path / "photo[1].png"]  # not a pattern
    assert expand_images([f"{tmp_path}/photo[0-9].png"]) == [tmp_path / "photo1.png"]  # no such file
    for empty in ("", "  "):
        with pytest.raises(InputSpecError, match="--image: expected an image file, a directory or a pattern"):
            expand_images([empty])
    # a symlinked folder: walked from its parent as a ** pattern walks it, each file once
    real = tmp_path / "real"
    real.mkdir()
    Image.new("RGB", (8, 8)).save(real / "x.png")
    (tmp_path / "tree").mkdir()
    (tmp_path / "tree" / "link").symlink_to(real, target_is_directory=True)
    (tmp_path / "tree" / "loop").symlink_to(tmp_path / "tree", target_is_directory=True)
    by_walk = expand_images([tmp_path / "tree"])
    by_glob = expand_images([f"{tmp_path}/tree/**/*.png"])
    assert by_walk == by_glob == [real / "x.png"]


def test_images_from_directories_patterns_and_lists(photos, tmp_path: Path, monkeypatch) -> None:
    found = expand_images([photos])
    names = [p.relative_to(photos).as_posix() for p in found]
    assert names == [
        "a/landscape.jpg",
        "a/portrait.PNG",
        "b/c/tiny.tif",
        "corrupt.jpg",
        "deep.png",
        "gray.png",
        "palette.gif",
        "rgba.png",
        "wide.bmp",
    ]  # sorted, recursive, any case of extension, no text file, no hidden file
    assert expand_images([f"{photos}/**/*.png"]) == [
        photos / "deep.png",
        photos / "gray.png",
        photos / "rgba.png",
    ]
    assert expand_images([f"{photos}/[ab]"]) == found[:3]  # a matched directory is searched
    # the same files named several ways are segmented once; a file named explicitly is
    # taken whatever its extension; list files: comments, blank lines, relative paths
    monkeypatch.chdir(photos)
    listing = tmp_path / "list.txt"
    listing.write_text("# my images\n\n  gray.png  \na/landscape.jpg\nmissing.png\n")
    (photos / "link.png").symlink_to(photos / "gray.png")
    try:
        got = expand_images(["gray.png", "link.png", "notes.txt", "a"], [listing])
    finally:
        (photos / "link.png").unlink()
    assert got == sorted(
        [
            photos / "gray.png",
            photos / "notes.txt",
            photos / "a/landscape.jpg",
            photos / "a/portrait.PNG",
            photos / "missing.png",
        ],
        key=str,
    )  # a listed file that is missing fails when it is read, like a corrupt one
    assert photos / "b/c/tiny.tif" not in expand_images([photos], exclude=[photos / "b"])


def test_arguments_that_name_no_image_are_refused(artifact, photos, tmp_path: Path) -> None:
    for images, message in (
        ((str(photos / "nothing-*.png"),), "got no match"),
        ((str(photos / "missing.jpg"),), "no such path"),
        ((str(photos / "b" / "c" / "nothing"),), "no such path"),
    ):
        out = tmp_path / "out"
        status, _, err = run_cli(_args(artifact, out, images=images))
        assert status == 2, err
        assert message in err and len(err.strip().splitlines()) == 1, err
        assert not out.exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("no images here")
    with pytest.raises(InputSpecError, match="holding image files"):
        expand_images([empty])
    (tmp_path / "list.txt").write_text("# only a comment\n\n")
    with pytest.raises(InputSpecError, match="one image path per line, got none"):
        expand_images([], [tmp_path / "list.txt"])
    status, _, err = run_cli(_args(artifact, tmp_path / "out"))
    assert status == 2 and "expected an image file, a directory or a pattern" in err


# -- one run: outputs, failures ------------------------------------------------------------


def test_a_bad_image_is_reported_and_skipped(reference, photos) -> None:
    out, status, err = reference
    assert status == 1
    corrupt = str(photos / "corrupt.jpg")
    skipped = [line for line in err.splitlines() if line.startswith("skipped")]
    assert len(skipped) == 1 and corrupt in skipped[0] and "expected a readable image file" in skipped[0]
    assert f"1 of 9 images failed; see {out / 'errors.jsonl'}" in err
    errors = [json.loads(line) for line in (out / "errors.jsonl").read_text().splitlines()]
    assert [(e["path"], e["index"]) for e in errors] == [(corrupt, 3)]
    results = _results(out)
    assert len(results) == 8 and corrupt not in results


def test_outputs_per_image_and_coco_json(reference) -> None:
    out, _, _ = reference
    results = _results(out)
    job = json.loads((out / "run.json").read_text())
    assert (job["batch_size"], job["max_pairs"], job["plan"]) == (
        BATCH,
        PAIRS,
        {"batches": 3, "phrase_chunk": 1},
    )
    instances = 0
    for path, line in results.items():
        with Image.open(path) as original:
            size = original.size
        assert (line["width"], line["height"]) == size
        with Image.open(out / line["overlay"]) as overlay:
            assert overlay.size == size and overlay.mode == "RGB"
        for entry in line["phrases"]:
            labels = np.asarray(Image.open(out / entry["mask_png"]))
            assert labels.shape == (line["height"], line["width"]) and labels.dtype == np.uint8
            for k, inst in enumerate(entry["instances"]):
                instances += 1
                decoded = mask_utils.decode(
                    {"size": inst["rle"]["size"], "counts": inst["rle"]["counts"].encode()}
                )
                assert decoded.sum() == inst["area"]
                assert ((labels == k + 1) <= decoded.astype(bool)).all()  # later ones may cover it
                assert THRESHOLD < inst["score"] <= 1.0
    assert instances > 0
    coco = COCO(str(out / "coco.json"))
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == PHRASES
    assert sorted(img["file_name"] for img in coco.imgs.values()) == sorted(results)
    assert len(coco.anns) == instances
    first = coco.anns[1]
    line = next(r for r in results.values() if r["index"] + 1 == first["image_id"])
    inst = line["phrases"][first["category_id"] - 1]["instances"][0]
    x0, y0, x1, y1 = inst["box_xyxy"]
    assert first["bbox"] == [x0, y0, x1 - x0, y1 - y0] and first["score"] == inst["score"]
    assert int(mask_utils.area(coco.annToRLE(first))) == first["area"] == inst["area"]
    umask = current_umask()  # every file and folder gets the permissions open() / mkdir give
    for path in [out, *out.rglob("*")]:
        want = (0o777 if path.is_dir() else 0o666) & ~umask
        assert path.stat().st_mode & 0o777 == want, path


def test_strict_stops_at_the_first_bad_image(artifact, photos, tmp_path: Path) -> None:
    out = tmp_path / "out"
    status, _, err = run_cli(_args(artifact, out, "--strict", images=(str(photos),)))
    assert status == 2, err
    lines = [line for line in err.splitlines() if not line.startswith("progress: ")]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "--strict" in lines[0], err
    assert str(photos / "corrupt.jpg") in lines[0] and "expected a readable image file" in lines[0]
    assert len(_results(out)) == 3  # the images before it stay written, for a --resume
    assert not (out / "errors.jsonl").exists() and not (out / "coco.json").exists()


def test_batch_size_3_and_1_agree_within_bound(reference, artifact, photos, tmp_path: Path) -> None:
    single = segment_images(
        [photos],
        PHRASES,
        artifact=artifact,
        out=tmp_path / "b1",
        threshold=THRESHOLD,
        threads=1,
        progress=False,
    )
    assert (single.segmented, single.failed) == (8, 1)
    ref, got = _results(reference[0]), _results(tmp_path / "b1")
    assert sorted(ref) == sorted(got)
    worst, far = 0.0, 0
    for path in ref:
        for a, b in zip(ref[path]["phrases"], got[path]["phrases"], strict=True):
            keep = [i["score"] for i in a["instances"] if abs(i["score"] - THRESHOLD) > SCORE_BOUND]
            other = [i["score"] for i in b["instances"] if abs(i["score"] - THRESHOLD) > SCORE_BOUND]
            assert len(keep) == len(other)  # the same instances, away from the threshold
            worst = max([worst, *(abs(x - y) for x, y in zip(keep, other, strict=True))])
            far += len(keep)
    print(f"batch size {BATCH} (pairs {PAIRS}) vs 1: max |score diff| {worst:.2g} over {far} instances")
    assert far > 0 and worst <= SCORE_BOUND


def test_label_pngs_are_16_bit_above_255_instances() -> None:
    n, side = 300, 20
    low = torch.full((n, side, side), -20.0)
    for k in range(n):
        low[k].view(-1)[k] = 20.0  # instance k covers pixel k alone
    boxes = torch.zeros(n, 4)
    pair = KeptPair(scores=torch.linspace(0.9, 0.6, n), boxes=boxes, low_masks=low, height=side, width=side)
    image = Image.fromarray(_rgb(9, side, side))
    encoded = encode_image(image, ["many"], [pair], overlay=False)
    labels = np.asarray(Image.open(io.BytesIO(encoded.mask_pngs[0])))
    assert labels.dtype != np.uint8 and int(labels.max()) == n
    expected = np.zeros(side * side, dtype=np.int64)
    expected[:n] = np.arange(1, n + 1)
    assert np.array_equal(labels.reshape(-1).astype(np.int64), expected)
    assert encoded.overlay_png is None and encoded.phrases[0]["instances"][299]["area"] == 1
    few = KeptPair(scores=pair.scores[:3], boxes=boxes[:3], low_masks=low[:3], height=side, width=side)
    nothing = KeptPair(scores=pair.scores[:0], boxes=boxes[:0], low_masks=low[:0], height=side, width=side)
    assert (
        np.asarray(Image.open(io.BytesIO(encode_image(image, ["x"], [few]).mask_pngs[0]))).dtype == np.uint8
    )
    plain = Image.open(io.BytesIO(encode_image(image, ["x"], [nothing]).overlay_png))
    assert plain.tobytes() == image.tobytes()  # nothing kept: the overlay is the image


def test_failed_images_stay_failed_on_resume_unless_retried_or_changed(artifact, tmp_path: Path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    Image.fromarray(_rgb(10, 40, 50)).save(folder / "good.png")
    (folder / "later.png").write_bytes(b"not yet a PNG")
    out = tmp_path / "out"
    assert run_cli(_args(artifact, out, images=(str(folder),)))[0] == 1
    status, printed, err = run_cli(_args(artifact, out, "--resume", images=(str(folder),)))  # unchanged
    assert status == 1 and "this run: 0 images, 2 done before" in printed and "1 of 2 images failed" in err
    status, printed, err = run_cli(_args(artifact, out, "--resume", "--retry-failed", images=(str(folder),)))
    assert status == 1 and "this run: 1 images, 1 done before" in printed and "1 of 2 images failed" in err
    assert len((out / "errors.jsonl").read_text().splitlines()) == 1
    Image.fromarray(_rgb(11, 30, 60)).save(folder / "later.png")  # the user fixes the file
    status, printed, _ = run_cli(_args(artifact, out, "--resume", images=(str(folder),)))
    assert status == 0 and "segmented 2 of 2 images" in printed and "this run: 1 images" in printed
    assert (out / "errors.jsonl").read_text() == "" and len(_results(out)) == 2
    status, _, err = run_cli(_args(artifact, tmp_path / "new", "--retry-failed", images=(str(folder),)))
    assert status == 2 and "expected with resume (--resume)" in err


def test_records_only_with_no_masks_and_no_overlay(artifact, photos, tmp_path: Path) -> None:
    out = tmp_path / "out"
    status, printed, _ = run_cli(
        _args(artifact, out, "--no-masks", "--no-overlay", images=(str(photos / "a"),))
    )
    assert status == 0 and "overlays:" not in printed
    assert sorted(p.name for p in out.iterdir()) == ["coco.json", "results.jsonl", "run.json"]
    for line in _results(out).values():
        assert line["overlay"] is None and all(entry["mask_png"] is None for entry in line["phrases"])
    assert len(COCO(str(out / "coco.json")).imgs) == 2


def test_progress_is_a_bar_on_a_terminal_and_lines_otherwise() -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    bar = Terminal()
    report = Progress(4, 1, stream=bar)
    report.update(2, failed=1)
    report.note("skipped x: broken")
    report.close()
    assert "3/4" in bar.getvalue() and "img" in bar.getvalue() and "skipped x: broken" in bar.getvalue()
    plain = io.StringIO()
    report = Progress(4, 1, stream=plain, every_s=0.0)
    report.update(1)
    report.update(1, failed=1)
    report.close()
    lines = plain.getvalue().splitlines()
    assert lines[0].startswith("progress: 2/4 images, ") and "left" in lines[0]
    assert lines[-1].startswith("progress: 3/4 images (1 failed), ") and len(lines) == 2
    quiet = io.StringIO()
    Progress(4, stream=quiet, enabled=False).close()
    assert quiet.getvalue() == ""


# -- interrupted runs ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def many(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("many")
    for i in range(24):
        Image.fromarray(_rgb(100 + i, 48 + i, 64)).save(folder / f"m{i:02d}.png")
    return folder


@pytest.fixture(scope="module")
def uninterrupted(artifact, many, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "uninterrupted"
    segment_images(
        [many],
        PHRASES,
        artifact=artifact,
        out=out,
        threshold=THRESHOLD,
        batch_size=2,
        threads=1,
        progress=False,
    )
    return out


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_killed_run_resumes_to_the_outputs_of_an_uninterrupted_one(
    artifact, many, uninterrupted, tmp_path: Path, signum: int
) -> None:
    out = tmp_path / "out"
    args = _args(artifact, out, "--batch-size", "2", images=(str(many),))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    child = subprocess.Popen(
        [sys.executable, "-m", "sam3_exportable.cli", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    results = out / "results.jsonl"
    deadline = time.monotonic() + 300
    while child.poll() is None and time.monotonic() < deadline:
        if results.is_file() and results.stat().st_size > 0:
            break
        time.sleep(0.005)
    child.send_signal(signum)
    _, err = child.communicate(timeout=120)
    assert child.returncode == (143 if signum == signal.SIGTERM else 130), err
    assert err.strip().splitlines()[-1].startswith(("terminated", "interrupted")), err
    written = results.read_text()
    assert written.endswith("\n") and 0 < written.count("\n") < 24
    assert _leftovers(out) == [] and not (out / "coco.json").exists()
    with results.open("ab") as fh:
        fh.write(b'{"index": 23, "path": "torn by a cra')  # what kill -9 mid-append leaves
    status, printed, err = run_cli([*args, "--resume"])
    assert status == 0, err
    assert f"{written.count(chr(10))} done before" in printed
    assert_same_outputs(uninterrupted, out)


# -- refusals --------------------------------------------------------------------------------


def _snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


def test_resume_refuses_another_job_and_writes_nothing(reference, artifact, photos, tmp_path: Path) -> None:
    out = reference[0]
    before = _snapshot(out)
    same = ("--batch-size", str(BATCH), "--max-pairs", str(PAIRS))
    cases = [
        (
            _args(
                artifact,
                out,
                "--resume",
                "--batch-size",
                "1",
                "--max-pairs",
                str(PAIRS),
                images=(str(photos),),
            ),
            "batch_size (3 in the job, 1 now)",
        ),
        (_args(artifact, out, "--resume", "--threshold", "0.3", *same, images=(str(photos),)), "threshold"),
        (
            _args(artifact, out, "--resume", "--threads", "2", *same, images=(str(photos),)),
            "threads (1 in the job, 2 now)",
        ),
        (_args(artifact, out, "--resume", "--no-overlay", *same, images=(str(photos),)), "overlay"),
        (_args(artifact, out, "--resume", *same, images=(str(photos / "a"),)), "images (0 added, 7 gone)"),
        (_args(artifact, out, *same, images=(str(photos),)), "pass --resume to continue it or --force"),
    ]
    phrases = [*_args(artifact, out, "--resume", *same, images=(str(photos),)), "--prompt", "a bird"]
    cases.append((phrases, "phrases"))
    for args, message in cases:
        status, _, err = run_cli(args)
        assert status == 2 and message in err and len(err.strip().splitlines()) == 1, (message, err)
    assert _snapshot(out) == before


def test_force_never_touches_a_directory_that_is_not_ours(
    artifact, photos, tmp_path: Path, monkeypatch
) -> None:
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("years of work")
    for extra in ((), ("--force",), ("--resume",)):
        status, _, err = run_cli(_args(artifact, foreign, *extra, images=(str(photos / "gray.png"),)))
        assert status == 2 and "no run.json" in err and len(err.strip().splitlines()) == 1, err
        assert sorted(p.name for p in foreign.iterdir()) == ["thesis.tex"]
    # a run.json that is not ours (another tool's) protects the directory too
    (foreign / "run.json").write_text('{"experiment": "mine"}')
    (foreign / "masks").mkdir()
    (foreign / "masks" / "label.png").write_bytes(b"precious")
    for extra in ((), ("--force",), ("--resume",)):
        status, _, err = run_cli(_args(artifact, foreign, *extra, images=(str(photos / "gray.png"),)))
        assert status == 2 and "that is not ours" in err and len(err.strip().splitlines()) == 1, err
        assert (foreign / "masks" / "label.png").read_bytes() == b"precious"
    assert sorted(p.name for p in foreign.iterdir()) == ["masks", "run.json", "thesis.tex"]
    monkeypatch.chdir(foreign)
    for out in (".", str(tmp_path)):
        status, _, err = run_cli(_args(artifact, Path(out), "--force", images=(str(photos / "gray.png"),)))
        assert status == 2 and "current directory or one of its parents" in err, err
    assert sorted(p.name for p in foreign.iterdir()) == ["masks", "run.json", "thesis.tex"]


# -- Ray -------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_cluster():
    """A one-node Ray cluster (2 CPUs) in its own process, as `ray start` makes one; its
    workers import the package from this checkout. Yields its address."""
    port = _free_port()
    temp = tempfile.mkdtemp(prefix="s3e-t-", dir="/tmp")  # Ray's socket paths must stay short
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_AUTH_MODE": "token",
    }
    head = subprocess.Popen(
        [
            str(Path(sys.executable).with_name("ray")),  # this Python's, not whatever PATH has
            "start",
            "--head",
            "--block",
            f"--port={port}",
            "--num-cpus=2",
            "--include-dashboard=false",
            f"--temp-dir={temp}",
            "--disable-usage-stats",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            assert head.poll() is None, "ray start exited"
            with contextlib.suppress(OSError):
                socket.create_connection(("127.0.0.1", port), 0.2).close()
                break
            assert time.monotonic() < deadline, "the Ray head did not come up"
            time.sleep(0.2)
        yield f"127.0.0.1:{port}"
        assert head.poll() is None, "the cluster went down with a driver"
    finally:
        head.send_signal(signal.SIGTERM)
        try:
            head.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
        shutil.rmtree(temp, ignore_errors=True)


def test_ray_with_two_workers_on_a_cluster_gives_the_local_outputs(
    reference, ray_cluster, artifact, photos, tmp_path: Path
) -> None:
    out = tmp_path / "cli"
    args = _args(
        artifact,
        out,
        "--engine",
        "ray",
        "--ray-address",
        ray_cluster,
        "--workers",
        "2",
        "--batch-size",
        str(BATCH),
        "--max-pairs",
        str(PAIRS),
        images=(str(photos),),
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run(
        [sys.executable, "-m", "sam3_exportable.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert run.returncode == 1, run.stderr[-3000:]
    assert "ray engine" in run.stdout  # how many of the 2 workers got a batch is Ray's choice
    assert_same_outputs(reference[0], out)


def test_segment_batch_in_your_own_ray_data_pipeline(ray_cluster, artifact, photos, tmp_path: Path) -> None:
    from sam3_exportable.batch.engines import import_ray

    ray = import_ray()  # sets Ray's environment (token authentication) before the first import
    paths = [str(p) for p in expand_images([photos])][:5]  # corrupt.jpg among them
    local = SegmentBatch(artifact, PHRASES, THRESHOLD, threads=1)
    expected = {p: o for path in paths for p, o in [(path, local.segment([path])[0])]}
    torch.set_num_threads(2)  # as conftest has it
    sigterm = signal.getsignal(signal.SIGTERM)
    ray.init(address=ray_cluster, log_to_driver=False)
    try:
        rows = (
            ray.data.read_binary_files(paths, include_paths=True)
            .rename_columns({"bytes": "image"})
            .map_batches(
                SegmentBatch,
                batch_size=1,  # one image per call: bitwise the B=1 outputs
                fn_constructor_kwargs={
                    "artifact": str(artifact),
                    "phrases": PHRASES,
                    "threshold": THRESHOLD,
                    "threads": 1,
                },
                compute=ray.data.ActorPoolStrategy(size=1),
                num_cpus=1,
            )
            .take_all()
        )
    finally:
        ray.shutdown()
        signal.signal(signal.SIGTERM, sigterm)
    assert sorted(r["path"] for r in rows) == sorted(paths)
    for row in rows:
        want = expected[row["path"]]
        assert bool(row["ok"]) == want.ok
        if not want.ok:
            assert "expected a readable image file" in row["error"] and row["record"] == ""
            continue
        assert json.loads(row["record"]) == want.record()
        assert [bytes(b) for b in row["mask_pngs"]] == want.encoded.mask_pngs
        assert bytes(row["overlay_png"]) == want.encoded.overlay_png


def test_ray_missing_is_one_line_naming_the_extra(artifact, photos, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now fails as if not installed
    out = tmp_path / "out"
    status, _, err = run_cli(_args(artifact, out, "--engine", "ray", images=(str(photos / "gray.png"),)))
    assert (
        status == 2 and "pip install 'sam3-exportable[ray]'" in err and len(err.strip().splitlines()) == 1
    ), err
    assert not out.exists()


def test_an_unreachable_cluster_is_one_line_and_nothing_is_written(artifact, photos, tmp_path: Path) -> None:
    with socket.socket() as closed:  # a port nothing listens on
        closed.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{closed.getsockname()[1]}"
    out = tmp_path / "out"
    status, _, err = run_cli(
        _args(artifact, out, "--engine", "ray", "--ray-address", address, images=(str(photos / "gray.png"),))
    )
    assert status == 2 and f"--ray-address {address}: expected a running Ray cluster" in err, err
    assert len(err.strip().splitlines()) == 1 and not out.exists()


def test_malformed_resume_state_is_one_line_naming_the_file_and_line(
    artifact, photos, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    image = (str(photos / "gray.png"),)
    assert run_cli(_args(artifact, out, images=image))[0] == 0
    results = out / "results.jsonl"
    good = results.read_text()
    for bad, expected in (
        ('{"index": 99}\n', "line 2: expected an image index in [0, 1), got 99"),
        ('{"path": "x"}\n', "line 2: expected an image index in [0, 1), got None"),
        ("not json\n", "line 2: expected a JSON object"),
    ):
        results.write_text(good + bad)
        status, _, err = run_cli(_args(artifact, out, "--resume", images=image))
        assert status == 2 and "results.jsonl" in err and expected in err, err
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
        assert results.read_text() == good + bad  # nothing was rewritten


def test_one_run_per_out_and_a_stale_lock_is_no_obstacle(artifact, photos, tmp_path: Path) -> None:
    import fcntl
    import os

    from sam3_exportable.batch.store import LOCK_FILE

    out = tmp_path / "out"
    image = (str(photos / "gray.png"),)
    assert run_cli(_args(artifact, out, images=image))[0] == 0
    assert not (out / LOCK_FILE).exists()  # released, and its file removed, at the end
    before = (out / "results.jsonl").read_bytes()
    fd = os.open(out / LOCK_FILE, os.O_RDWR | os.O_CREAT)  # another run holds the directory
    os.write(fd, b"4242\n")
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        for extra in (("--resume",), ("--force",)):
            status, _, err = run_cli(_args(artifact, out, *extra, images=image))
            assert status == 2 and "a run in progress (pid 4242)" in err, err
            assert len(err.strip().splitlines()) == 1
        assert (out / "results.jsonl").read_bytes() == before
    finally:
        os.close(fd)  # the holder dies: its lock file stays, its flock is gone
    assert (out / LOCK_FILE).exists()
    status, _, err = run_cli(_args(artifact, out, "--force", images=image))
    assert status == 0, err
    assert (out / "results.jsonl").read_bytes() == before and not (out / LOCK_FILE).exists()


def test_resume_runs_a_changed_image_again_and_keeps_one_line_per_image(
    artifact, photos, tmp_path: Path
) -> None:
    import os

    from PIL import Image

    folder = tmp_path / "in"
    folder.mkdir()
    for name in ("a.png", "b.png"):
        Image.new("RGB", (48, 32), (10, 200, 30)).save(folder / name)
    out = tmp_path / "out"
    assert run_cli(_args(artifact, out, images=(str(folder),)))[0] == 0
    before = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [r["source"]["size"] for r in before] == [os.path.getsize(folder / n) for n in ("a.png", "b.png")]
    Image.new("RGB", (64, 40), (200, 10, 90)).save(folder / "b.png")  # b changed since
    stat = os.stat(folder / "b.png")
    os.utime(folder / "b.png", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    status, _, err = run_cli(_args(artifact, out, "--resume", images=(str(folder),)))
    assert status == 0, err
    after = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [r["index"] for r in after] == [0, 1]  # one line per image
    assert after[0] == before[0] and (after[1]["width"], after[1]["height"]) == (64, 40)
    coco = json.loads((out / "coco.json").read_text())
    assert [(i["width"], i["height"]) for i in coco["images"]] == [(48, 32), (64, 40)]


def test_a_dangling_symlink_out_and_a_bom_in_a_list_are_named(artifact, photos, tmp_path: Path) -> None:
    dangling = tmp_path / "out"
    dangling.symlink_to(tmp_path / "nowhere", target_is_directory=True)
    status, _, err = run_cli(_args(artifact, dangling, images=(str(photos / "gray.png"),)))
    assert status == 2 and "is a symbolic link to" in err and "which does not exist" in err, err
    listing = tmp_path / "list.txt"
    listing.write_bytes(b"\xef\xbb\xbf" + str(photos / "gray.png").encode() + b"\n")  # a BOM first
    assert expand_images([], [listing]) == [photos / "gray.png"]


def test_resume_after_the_manifest_copy_is_removed_or_the_artifact_moved(
    artifact, onnx_pair, photos, tmp_path: Path
) -> None:
    """The export id inside the artifact identifies it; the sha256 (kept in the copy beside
    the file) is compared only where both runs know it; another export is named as such."""
    moved = tmp_path / "deployed" / "model.pt2"
    moved.parent.mkdir()
    shutil.copy2(artifact, moved)
    shutil.copy2(f"{artifact}.json", f"{moved}.json")
    out = tmp_path / "run"
    image = (str(photos / "gray.png"),)
    status, _, err = run_cli(_args(moved, out, images=image))
    assert status == 0, err
    lines = (out / "results.jsonl").read_text()
    Path(f"{moved}.json").unlink()  # deployed without the copy: the hash of the file is unknown now
    status, printed, err = run_cli(_args(moved, out, "--resume", images=image))
    assert status == 0 and "1 done before" in printed, err
    status, printed, err = run_cli(_args(artifact, out, "--resume", images=image))  # same export, elsewhere
    assert status == 0 and "1 done before" in printed, err
    assert (out / "results.jsonl").read_text() == lines
    status, _, err = run_cli(_args(onnx_pair[0], out, "--resume", images=image))
    assert status == 2 and len(err.strip().splitlines()) == 1, err
    assert "another export" in err and str(onnx_pair[0].resolve()) in err, err
    assert (out / "results.jsonl").read_text() == lines
