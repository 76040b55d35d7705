"""Every CLI failure a user can cause: exit status 2 (130/143 for interrupts), one line on
stderr naming the input, what was expected and what came, no traceback, nothing written."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest

from sam3_exportable import cli
from sam3_exportable.cli import main

EXPORT = ["export", "--size", "tiny", "--random-weights", "--malloc", "default"]


def _one_line_error(capsys, status: int, *needles: str) -> str:
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert "Traceback" not in captured.err and err.count("\n") == 0, captured.err
    for needle in needles:
        assert needle in err, err
    return captured.out


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (
            ["export", "--random-weights", "--out", "x.pt2", "--threads", "-1"],
            ["--threads", "an integer in [1, 1024], got -1"],
        ),
        (
            ["export", "--random-weights", "--out", "x.pt2", "--verify", "0,1"],
            ["--verify", "B >= 1 and P >= 1"],
        ),
        (["export", "--random-weights", "--out", "x.pt2", "--verify", "two"], ["--verify", "expected B,P"]),
        (["export", "--out", "x.pt2"], ["one of the arguments --checkpoint --random-weights is required"]),
        (
            ["predict", "--model", "m.pt2", "--image", "a", "--out", "o", "--threads", "100000"],
            ["--threads", "an integer in [1, 1024], got 100000"],
        ),
        (["export", "--random-weights", "--out", "x.pt2", "--seed", str(2**64)], ["--seed", "[0, 2**63)"]),
        (["export", "--random-weights", "--out", "x.pt2", "--seed", "-1"], ["--seed", "[0, 2**63)"]),
        (["bench", "--scaling-budget", "-1"], ["--scaling-budget", "positive number, got -1"]),
        (["bench", "--resume", "--force"], ["--force", "not allowed with argument --resume"]),
        (["predict", "--model", "m.pt2", "--image", "a.jpg", "--out", "o", "--threshold", "2"], ["[0, 1]"]),
        (["nope"], ["invalid choice: 'nope'"]),
    ],
)
def test_bad_arguments(args: list[str], needles: list[str], capsys, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(args) == 2
    _one_line_error(capsys, 2, *needles)
    assert list(tmp_path.iterdir()) == []


def test_a_directory_as_out_is_refused_before_any_work(tmp_path: Path, capsys) -> None:
    (tmp_path / "build").mkdir()
    assert main([*EXPORT, "--out", str(tmp_path / "build"), "--force"]) == 2
    out = _one_line_error(capsys, 2, "is a directory; expected the path of a file")
    assert "[build]" not in out  # refused before the model was built
    assert [p.name for p in tmp_path.iterdir()] == ["build"] and not any((tmp_path / "build").iterdir())


def test_an_unwritable_out_is_refused_before_any_work(tmp_path: Path, capsys) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("a file where a directory should be")
    assert main([*EXPORT, "--out", str(blocker / "sub" / "t.pt2")]) == 2
    out = _one_line_error(capsys, 2, "expected a directory at", "found a file")
    assert "[build]" not in out


def test_a_verify_shape_that_cannot_fit_is_refused_before_the_export(tmp_path: Path, capsys) -> None:
    assert main([*EXPORT, "--out", str(tmp_path / "t.pt2"), "--verify", "99999999,1"]) == 2
    out = _one_line_error(capsys, 2, "verify: expected a shape whose inputs and outputs fit in memory", "GiB")
    assert "[export]" not in out and list(tmp_path.iterdir()) == []


def test_a_foreign_zip_with_a_forged_manifest_is_one_line(tmp_path: Path, capsys) -> None:
    forged = tmp_path / "forged.pt2"
    with zipfile.ZipFile(forged, "w") as archive:
        archive.writestr("forged/data.txt", "not a program")
    Path(f"{forged}.json").write_text(json.dumps({"format": "sam3-exportable", "format_version": 2}))
    image = tmp_path / "a.png"
    from PIL import Image

    Image.new("RGB", (20, 20)).save(image)
    out = tmp_path / "out"
    assert main(["predict", "--model", str(forged), "--image", str(image), "--prompt", "a dog",
                 "--out", str(out), "--malloc", "default"]) == 2  # fmt: skip
    _one_line_error(capsys, 2, "forged.pt2", "carries no manifest")
    assert not out.exists()


@pytest.mark.parametrize(
    ("exc", "status", "note"),
    [(KeyboardInterrupt, 130, "interrupted (Ctrl-C)"), (cli._Terminated, 143, "terminated (SIGTERM)")],
)
def test_interrupts_exit_with_one_line(monkeypatch, tmp_path: Path, capsys, exc, status, note) -> None:
    def interrupted(args):
        raise exc

    parser = cli.build_parser
    monkeypatch.setattr(cli, "build_parser", lambda: _with_func(parser(), "export", interrupted))
    assert main([*EXPORT, "--out", str(tmp_path / "t.pt2")]) == status
    _one_line_error(capsys, status, note)


def _with_func(parser, command: str, func):
    for action in parser._subparsers._group_actions:
        action.choices[command].set_defaults(func=func)
    return parser


def test_a_full_disk_is_one_line(monkeypatch, tmp_path: Path, capsys) -> None:
    import errno

    def full(args):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "t.pt2"))

    parser = cli.build_parser
    monkeypatch.setattr(cli, "build_parser", lambda: _with_func(parser(), "export", full))
    assert main([*EXPORT, "--out", str(tmp_path / "t.pt2")]) == 2
    _one_line_error(capsys, 2, "t.pt2: No space left on device")


def test_a_closed_stdout_ends_the_run_cleanly_with_every_output(onnx_pair, tmp_path: Path) -> None:
    import subprocess
    import sys

    from PIL import Image

    for i in range(2):
        Image.new("RGB", (40 + i, 30), (i * 90, 20, 200)).save(tmp_path / f"{i}.png")
    out = tmp_path / "out"
    args = ["predict", "--model", str(onnx_pair[0]), "--image", str(tmp_path), "--prompt", "a dog"]
    args += ["--out", str(out), "--threads", "2", "--threshold", "0.0"]
    cli_path = Path(sys.executable).with_name("sam3-exportable")  # this Python's, not PATH's
    proc = subprocess.Popen([str(cli_path), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # the reader is gone before the first line (`... | head -0`)
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=300) == 0, err
    assert "Traceback" not in err and "BrokenPipe" not in err, err
    assert len((out / "results.jsonl").read_text().splitlines()) == 2
    assert len(json.loads((out / "coco.json").read_text())["images"]) == 2


def test_a_truncated_phrase_warns_once_in_one_line(onnx_pair, tmp_path: Path, capsys) -> None:
    from PIL import Image

    long = "dog " * 40
    assert main(["tokenize", "--prompt", long]) == 0
    err = capsys.readouterr().err.strip()
    assert err.startswith("warning: phrase") and "truncated" in err and err.count("\n") == 0, err
    Image.new("RGB", (40, 30)).save(tmp_path / "a.png")
    args = ["predict", "--model", str(onnx_pair[0]), "--image", str(tmp_path / "a.png"), "--prompt", long]
    assert main([*args, "--out", str(tmp_path / "out"), "--threads", "1", "--malloc", "default"]) == 0
    err = capsys.readouterr().err
    assert err.count("truncated") == 1 and "UserWarning" not in err, err
