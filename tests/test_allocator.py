"""The malloc policy: it stops the re-faulting of freed memory and changes no numbers.

The policy is process-wide, so everything that applies it runs in a child process.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from sam3_exportable import allocator
from sam3_exportable.allocator import glibc_version
from sam3_exportable.cli import build_parser

glibc_only = pytest.mark.skipif(glibc_version() is None, reason="needs glibc")


def _child(script: str) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


_FAULTS = """
    import ctypes, json, resource
    import torch
    from sam3_exportable.allocator import apply_malloc_policy
    # count 4 KiB pages whatever the machine's transparent-huge-page setting
    ctypes.CDLL("libc.so.6").prctl(41, 1, 0, 0, 0)  # PR_SET_THP_DISABLE
    record = apply_malloc_policy("{policy}")
    def block():  # 64 MiB, far over glibc's largest mmap threshold (32 MiB)
        t = torch.empty(16 << 20, dtype=torch.float32)
        t.fill_(1.0)
        return float(t[-1])
    for _ in range(12):  # the heap settles after some blocks (7 after importing torch alone)
        block()
    faults = []  # per block
    for _ in range(8):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        block()
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    print(json.dumps({{"record": record, "faults": faults}}))
"""


@glibc_only
def test_retain_reuses_freed_blocks_instead_of_faulting_them_in_again() -> None:
    default = _child(_FAULTS.format(policy="default"))
    retain = _child(_FAULTS.format(policy="retain"))
    pages = (64 << 20) // 4096  # 16,384 pages in each 64 MiB block
    # malloc's settings unchanged: each block is a fresh mmap, every page faults again
    assert default["record"] == {"policy": "default", "applied": False, "reason": "requested"}
    assert min(default["faults"]) >= pages * 0.9, default
    # retain: the freed block is reused from the heap
    record = retain["record"]
    assert record["policy"] == "retain" and record["applied"] is True
    assert record["settings"] == {"M_MMAP_MAX": True, "M_TRIM_THRESHOLD": True}
    # (now and then the heap grows once more for a block: most blocks must be reused)
    assert sorted(retain["faults"])[len(retain["faults"]) // 2] < pages // 100, retain


_TRIM = """
    import ctypes, json
    from sam3_exportable.allocator import apply_malloc_policy
    class MallInfo2(ctypes.Structure):  # glibc >= 2.33
        _fields_ = [(name, ctypes.c_size_t) for name in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd",
            "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    libc.mallinfo2.restype = MallInfo2
    record = apply_malloc_policy("retain")
    if {old_threshold}:  # what retain set before: the largest positive C int
        libc.mallopt(-1, 2**31 - 1)
    size = {size}  # from the heap (M_MMAP_MAX=0), never written to
    block = libc.malloc(size)
    if block:
        libc.free(block)
    print(json.dumps({{"record": record, "heap_after_free": libc.mallinfo2().arena, "got": bool(block)}}))
"""


@glibc_only
def test_retain_never_trims_the_heap_even_after_a_peak_above_2_gib() -> None:
    # A full-size forward at (1,8) frees more than 2 GiB at once. With M_TRIM_THRESHOLD at
    # 2**31-1 glibc gave that top back to the kernel and every forward faulted it in again
    # (0.4 million faults and 2.6 s of kernel time per run in the bench); -1 never trims.
    size = 5 << 29  # 2.5 GiB
    retain = _child(_TRIM.format(old_threshold=False, size=size))
    if not retain["got"]:
        pytest.skip("this host refused 2.5 GiB of address space (strict overcommit?)")
    assert retain["record"]["applied"] is True
    assert retain["record"]["reason"].endswith("mallopt M_MMAP_MAX=0, M_TRIM_THRESHOLD=-1")
    assert retain["heap_after_free"] >= size, retain
    old = _child(_TRIM.format(old_threshold=True, size=size))
    assert old["got"], old
    assert old["heap_after_free"] < size // 4, old  # given back: only the ~0.15 GiB the imports use


@glibc_only
def test_retain_changes_no_output_of_the_tiny_model(tmp_path: Path) -> None:
    script = """
        import json, sys, torch
        from sam3_exportable.allocator import apply_malloc_policy
        apply_malloc_policy(sys.argv[1])
        from sam3_exportable.export.builders import build_model
        from sam3_exportable.patching.selection import exportable_sam3
        from sam3_exportable.export.pipeline import FullSam3PipelineWrapper, synthetic_inputs
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


@pytest.fixture
def fresh_record(monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep this process's policy record out of reach of the tests below."""
    monkeypatch.setattr(allocator, "_applied", dict(allocator._applied))


def test_without_glibc_nothing_is_applied_and_the_reason_is_recorded(
    monkeypatch: pytest.MonkeyPatch, fresh_record: None
) -> None:
    def no_confstr(name: str) -> str:
        raise ValueError(f"unrecognized configuration name {name!r}")

    monkeypatch.setattr(allocator.os, "confstr", no_confstr)
    record = allocator.apply_malloc_policy("retain")
    assert record["applied"] is False and record["policy"] == "default" and "settings" not in record
    assert "retain needs glibc" in record["reason"]
    assert allocator.current_malloc_policy() == record


@glibc_only
def test_a_preloaded_allocator_is_detected(monkeypatch: pytest.MonkeyPatch, fresh_record: None) -> None:
    assert allocator._mallopt()[0] is not None  # this process: glibc's own malloc
    real = allocator.ctypes.CDLL

    class Process:  # what CDLL(None) shows when jemalloc is preloaded: another malloc
        malloc = real("libc.so.6").free

    monkeypatch.setattr(allocator.ctypes, "CDLL", lambda name: Process() if name is None else real(name))
    record = allocator.apply_malloc_policy("retain")
    assert record["applied"] is False and "not glibc's" in record["reason"]


def test_refused_mallopt_is_reported_not_claimed(monkeypatch: pytest.MonkeyPatch, fresh_record: None) -> None:
    monkeypatch.setattr(allocator, "_mallopt", lambda: (lambda param, value: 0, "glibc 2.36"))
    record = allocator.apply_malloc_policy("retain")
    assert record == {
        "policy": "default",
        "applied": False,
        "reason": "glibc 2.36: mallopt refused M_MMAP_MAX, M_TRIM_THRESHOLD",
        "settings": {"M_MMAP_MAX": False, "M_TRIM_THRESHOLD": False},
    }


def test_half_applied_policy_is_not_called_applied_and_survives_default(
    monkeypatch: pytest.MonkeyPatch, fresh_record: None
) -> None:
    # glibc took M_MMAP_MAX (-4) and refused the trim threshold
    monkeypatch.setattr(allocator, "_mallopt", lambda: (lambda param, value: int(param == -4), "glibc 2.36"))
    record = allocator.apply_malloc_policy("retain")
    assert record["policy"] == "retain" and record["applied"] is False
    assert record["reason"] == "glibc 2.36: mallopt refused M_TRIM_THRESHOLD"
    # the process cannot go back: asking for 'default' afterwards keeps the true record
    assert allocator.apply_malloc_policy("default") == record == allocator.current_malloc_policy()
    # monkeypatch restores the real record: the autouse guard sees this process unchanged


def test_default_alone_is_recorded_as_requested(fresh_record: None) -> None:
    assert allocator.apply_malloc_policy("default") == {
        "policy": "default",
        "applied": False,
        "reason": "requested",
    }


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


def test_export_and_predict_apply_the_policy_in_their_process_bench_in_each_job(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from sam3_exportable import cli

    applied: list[str] = []
    monkeypatch.setattr(allocator, "apply_malloc_policy", applied.append)
    for name in ("export_command", "predict_command", "bench_command"):
        monkeypatch.setattr(cli, name, lambda args: 0)
    assert cli.main(["export", "--size", "tiny", "--random-weights", "--out", "x.pt2"]) == 0
    assert (
        cli.main(
            ["predict", "--model", "m", "--image", "i", "--prompt", "a", "--out", "o", "--malloc", "default"]
        )
        == 0
    )
    assert cli.main(["bench", "--size", "tiny"]) == 0  # its jobs apply it, not this process
    assert applied == ["retain", "default"]
