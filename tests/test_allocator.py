"""The malloc policy: it stops the re-faulting of freed memory and changes no numbers.

The policy is process-wide, so everything that applies it runs in a child process.
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from sam3_exportable import allocator
from sam3_exportable.cli import build_parser

glibc_only = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="needs glibc"
)


def _child(script: str) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


_FAULTS = """
    import json, resource, sys
    import torch
    from sam3_exportable.allocator import apply_malloc_policy
    record = apply_malloc_policy(sys.argv[1] if len(sys.argv) > 1 else "{policy}")
    def block():  # 64 MiB, far over glibc's largest mmap threshold (32 MiB)
        t = torch.empty(16 << 20, dtype=torch.float32)
        t.fill_(1.0)
        return float(t[-1])
    for _ in range(3):  # the heap settles after a couple of blocks
        block()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(4):
        block()
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    print(json.dumps({{"record": record, "faults": faults}}))
"""


@glibc_only
def test_retain_reuses_freed_blocks_instead_of_faulting_them_in_again() -> None:
    default = _child(_FAULTS.format(policy="default"))
    retain = _child(_FAULTS.format(policy="retain"))
    pages = (64 << 20) // 4096  # 16,384 pages in each 64 MiB block
    # glibc's default: each block is a fresh mmap, every page faults again
    assert default["record"] == {"policy": "default", "applied": False, "reason": "requested"}
    assert default["faults"] >= 4 * pages * 0.9, default
    # retain: the freed block is reused from the heap
    assert retain["record"]["policy"] == "retain" and retain["record"]["applied"] is True
    assert retain["faults"] < pages // 4, retain


@glibc_only
def test_retain_changes_no_output_of_the_tiny_model(tmp_path: Path) -> None:
    script = """
        import json, sys, torch
        from sam3_exportable.allocator import apply_malloc_policy
        apply_malloc_policy(sys.argv[1])
        from sam3_exportable.builders import build_model
        from sam3_exportable.patch_set import exportable_sam3
        from sam3_exportable.pipeline import FullSam3PipelineWrapper, synthetic_inputs
        wrapper = FullSam3PipelineWrapper(build_model("tiny", seed=0)).eval()
        inputs = synthetic_inputs(wrapper.image_size, wrapper.context_length, 2, 3, seed=1)
        with exportable_sam3(), torch.inference_mode():
            outs = wrapper(*inputs)
        torch.save(outs, sys.argv[2])
        print(json.dumps({"ok": True}))
    """
    paths = []
    for policy in ("default", "retain"):
        path = str(tmp_path / f"{policy}.pt")
        proc = subprocess.run(
            [sys.executable, "-c", textwrap.dedent(script), policy, path],
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        paths.append(path)
    default, retain = (torch.load(p) for p in paths)
    assert len(default) == len(retain) == 4
    assert all(torch.equal(a, b) for a, b in zip(default, retain, strict=True))


def test_unknown_policy_is_refused() -> None:
    expected = r"malloc policy: expected one of \['retain', 'default'\], got 'tcmalloc'"
    with pytest.raises(ValueError, match=expected):
        allocator.apply_malloc_policy("tcmalloc")


def test_without_glibc_nothing_is_applied_and_the_reason_is_recorded(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(allocator, "_applied", dict(allocator._applied))
    monkeypatch.setattr(allocator.platform, "libc_ver", lambda: ("", ""))
    record = allocator.apply_malloc_policy("retain")
    assert record["applied"] is False and record["policy"] == "default"
    assert "retain needs glibc" in record["reason"]
    assert allocator.current_malloc_policy() == record


def test_refused_mallopt_is_reported_not_claimed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(allocator, "_applied", dict(allocator._applied))
    monkeypatch.setattr(allocator, "_glibc_mallopt", lambda: lambda param, value: 0)
    record = allocator.apply_malloc_policy("retain")
    assert record == {"policy": "default", "applied": False, "reason": "glibc mallopt refused a setting"}


def test_commands_take_a_malloc_policy() -> None:
    parser = build_parser()
    for command in (
        ["export", "--size", "tiny", "--random-weights", "--out", "x.pt2"],
        ["predict", "--model", "m.pt2", "--image", "i.png", "--prompt", "a", "--out", "o"],
        ["bench", "--size", "tiny"],
    ):
        assert parser.parse_args(command).malloc == "retain"
        assert parser.parse_args([*command, "--malloc", "default"]).malloc == "default"
    with pytest.raises(SystemExit):
        parser.parse_args(["bench", "--malloc", "jemalloc"])
