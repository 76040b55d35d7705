"""Artifact writes: an interrupt, a kill or a full disk at any moment leaves the old artifact or
the new one loadable, never a mismatched pair or an orphan; files get the user's umask."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from sam3_exportable.artifact import files, load_artifact, manifest_path, read_manifest, save_pipeline
from sam3_exportable.artifact.files import Staging, check_output_dir, check_output_file
from sam3_exportable.artifact.manifest import Manifest
from sam3_exportable.artifact.program import Provenance
from sam3_exportable.errors import OutputExistsError, OutputPathError


@pytest.fixture
def old_artifact(tiny_ep, tmp_path: Path) -> tuple[Path, Manifest, bytes]:
    path = tmp_path / "a.pt2"
    manifest = save_pipeline(tiny_ep, path)
    return path, manifest, path.read_bytes()


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


def test_a_kill_between_the_two_renames_leaves_the_new_artifact_loadable(
    tiny_ep, old_artifact, monkeypatch: pytest.MonkeyPatch
) -> None:
    path, old, _ = old_artifact
    real = os.replace
    calls: list[str] = []

    def dies_after_the_first(src, dst) -> None:
        calls.append(str(dst))
        if len(calls) == 2:  # the .pt2 is in place, its manifest copy is not: kill -9 here
            raise KeyboardInterrupt
        real(src, dst)

    monkeypatch.setattr(files.os, "replace", dies_after_the_first)
    with pytest.raises(KeyboardInterrupt):
        save_pipeline(tiny_ep, path, force=True)
    monkeypatch.undo()
    assert calls == [str(path), str(manifest_path(path))]
    assert json.loads(manifest_path(path).read_text())["artifact_id"] == old.artifact_id  # stale copy
    new = read_manifest(path)  # the file's own manifest wins over the stale copy
    assert new.artifact_id != old.artifact_id and new.file is None
    assert load_artifact(path).kind == "pt2"
    assert _leftovers(path.parent) == []
    save_pipeline(tiny_ep, path, force=True)  # a re-run is not blocked and repairs the pair
    assert read_manifest(path).file is not None


def test_a_full_disk_leaves_the_old_artifact_as_it_was(tiny_ep, old_artifact, monkeypatch) -> None:
    path, old, before = old_artifact
    real = Path.write_text

    def disk_full(self, *args, **kwargs):
        if self.name.startswith(f".{path.name}.json."):
            raise OSError(errno.ENOSPC, "No space left on device", str(self))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", disk_full)
    with pytest.raises(OSError, match="No space left"):
        save_pipeline(tiny_ep, path, force=True)
    monkeypatch.undo()
    assert path.read_bytes() == before and read_manifest(path).artifact_id == old.artifact_id
    assert _leftovers(path.parent) == []


_SAVER = textwrap.dedent(
    """
    import signal, sys, torch, torchvision
    from sam3_exportable.artifact import read_manifest, save_pipeline
    from sam3_exportable.artifact.program import Provenance
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # what the CLI does: clean up, exit
    ep = torch.export.load(sys.argv[1])
    provenance = Provenance.of_manifest(read_manifest(sys.argv[1]))
    print("ready", flush=True)
    while True:
        save_pipeline(ep, sys.argv[2], force=True, provenance=provenance)
    """
)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL])
def test_signals_at_random_moments_never_break_the_artifact(old_artifact, tmp_path: Path, sig) -> None:
    source, _, _ = old_artifact
    target = tmp_path / "out" / "b.pt2"
    target.parent.mkdir()
    save_pipeline(torch.export.load(source), target, provenance=Provenance.of_manifest(read_manifest(source)))
    for delay in (0.7, 1.9):
        proc = subprocess.Popen(
            [sys.executable, "-c", _SAVER, str(source), str(target)], stdout=subprocess.PIPE, text=True
        )
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        time.sleep(delay)
        proc.send_signal(sig)
        proc.wait(60)
        manifest = read_manifest(target)
        artifact = load_artifact(target)  # sha256 checked whenever the copy belongs to the file
        assert artifact.manifest.artifact_id == manifest.artifact_id
        if sig != signal.SIGKILL:  # a catchable signal lands outside the renames: always a pair
            assert manifest.file is not None, delay
            assert _leftovers(target.parent) == []


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_files_get_the_umask_permissions(tiny_ep, tmp_path: Path, umask: int, mode: int) -> None:
    previous = os.umask(umask)
    try:
        save_pipeline(tiny_ep, tmp_path / "u.pt2")
    finally:
        os.umask(previous)
    for path in (tmp_path / "u.pt2", manifest_path(tmp_path / "u.pt2")):
        assert path.stat().st_mode & 0o777 == mode, oct(path.stat().st_mode)


def test_output_paths_are_checked_before_anything_is_written(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "dir").mkdir()
    with pytest.raises(OutputPathError, match="is a directory; expected the path of a file"):
        check_output_file(tmp_path / "dir", force=True)
    (tmp_path / "f.pt2").write_bytes(b"keep")
    with pytest.raises(OutputExistsError, match="exists; pass --force"):
        check_output_file(tmp_path / "f.pt2", force=False)
    with pytest.raises(OutputPathError, match=r"expected a directory at .*f.pt2, found a file"):
        check_output_file(tmp_path / "f.pt2" / "x.pt2", force=True)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(OutputPathError, match="is the current directory or one of its parents"):
        check_output_dir(".")
    with pytest.raises(OutputPathError, match="is the current directory or one of its parents"):
        check_output_dir("..")

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(files.tempfile, "mkstemp", read_only)
    with pytest.raises(OutputPathError, match=r"cannot write in .*: Read-only file system"):
        check_output_file(tmp_path / "new.pt2", force=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir", "f.pt2"]


def test_staging_commits_all_or_nothing(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="half-way"), Staging() as staging:
        staging.file(tmp_path / "a").write_text("a")
        staging.file(tmp_path / "b").write_text("b")
        raise RuntimeError("half-way")
    assert list(tmp_path.iterdir()) == []
    with Staging() as staging:
        staging.file(tmp_path / "a").write_text("a")
        staging.file(tmp_path / "b").write_text("b")
        staging.commit()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]
