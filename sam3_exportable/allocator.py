"""Process-wide malloc policy for CPU inference: keep freed memory for reuse.

A full-size forward allocates and frees tens of GiB of activations, most of them in blocks
far larger than glibc's mmap threshold (at most 32 MiB). glibc serves each such block with
a fresh ``mmap`` and returns it with ``munmap`` on free, so every forward touches every
page of them for the first time again: on this project's 2-core reference machine, about
3.5 million minor page faults and 9 s of kernel time per (1, 2) forward, one tenth of the
CPU time, for eager and ``.pt2`` alike. The ``retain`` policy tells glibc to serve all
blocks from its heap (``M_MMAP_MAX = 0``) and not to give the heap's free top back to the
kernel (``M_TRIM_THRESHOLD`` at its maximum): later forwards reuse the same pages (32
thousand faults, 0.1 s of kernel time). The price is that memory freed after a peak stays
with the process until it exits, which is what a model server or a batch job wants anyway.

The policy is process-wide and cannot be undone for memory already in use, so nothing in
this library applies it on import or on load: call :func:`apply_malloc_policy` once at the
start of the process (the ``predict`` and ``bench`` commands do, ``--malloc default`` to
opt out). It changes no numerics. It needs glibc (Linux); elsewhere it is reported as not
applied and nothing changes. PyTorch's CPU tuning guide recommends an allocator that
reuses memory (jemalloc, tcmalloc) for the same reason; this one needs no extra library.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import platform
from collections.abc import Callable
from typing import Any

__all__ = ["MALLOC_POLICIES", "apply_malloc_policy", "current_malloc_policy"]

_log = logging.getLogger(__name__)

#: Policies :func:`apply_malloc_policy` accepts.
MALLOC_POLICIES = ("retain", "default")

# mallopt parameter numbers from glibc's <malloc.h>
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_TRIM_MAX = 2**31 - 1  # mallopt takes a C int

_applied: dict[str, Any] = {"policy": "default", "applied": False, "reason": "not requested"}


def _glibc_mallopt() -> Callable[[int, int], int] | None:
    """glibc's ``mallopt``, or None when this process does not run on glibc."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return None
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return mallopt  # type: ignore[no-any-return]


def apply_malloc_policy(policy: str = "retain") -> dict[str, Any]:
    """Apply ``policy`` to this process's malloc and return what happened.

    ``"retain"``: serve every block from the heap and keep freed memory for reuse (see the
    module docstring). ``"default"``: change nothing (glibc's defaults stay, or whatever an
    earlier call set: a process cannot go back once memory was retained).

    Returns ``{"policy", "applied", "reason"}``: ``applied`` is True only when glibc
    accepted every setting; ``reason`` says why not otherwise. The same record is what
    :func:`current_malloc_policy` returns afterwards.

    Raises:
        ValueError: ``policy`` is not one of :data:`MALLOC_POLICIES`.
    """
    global _applied
    if policy not in MALLOC_POLICIES:
        raise ValueError(f"malloc policy: expected one of {list(MALLOC_POLICIES)}, got {policy!r}")
    if policy == "default":
        if not _applied["applied"]:
            _applied = {"policy": "default", "applied": False, "reason": "requested"}
        return dict(_applied)
    mallopt = _glibc_mallopt()
    if mallopt is None:
        record = {
            "policy": "default",
            "applied": False,
            "reason": f"retain needs glibc; this process runs on {platform.system()} "
            f"{'/'.join(v for v in platform.libc_ver() if v) or 'without glibc'}",
        }
        _log.info("malloc policy 'retain' not applied: %s", record["reason"])
    else:
        ok = mallopt(_M_MMAP_MAX, 0) == 1 and mallopt(_M_TRIM_THRESHOLD, _TRIM_MAX) == 1
        record = {
            "policy": "retain" if ok else "default",
            "applied": ok,
            "reason": "glibc mallopt M_MMAP_MAX=0, M_TRIM_THRESHOLD=2**31-1"
            if ok
            else "glibc mallopt refused a setting",
        }
        if not ok:
            _log.warning("malloc policy 'retain' not applied: %s", record["reason"])
    _applied = record
    return dict(record)


def current_malloc_policy() -> dict[str, Any]:
    """The record of the last :func:`apply_malloc_policy` call in this process."""
    return dict(_applied)
