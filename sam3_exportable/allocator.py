"""Process-wide malloc policy for CPU inference: keep freed memory for reuse.

A full-size forward allocates and frees tens of GiB of activations, most of them in blocks
far larger than glibc's mmap threshold (at most 32 MiB). glibc serves each such block with
a fresh ``mmap`` and returns it with ``munmap`` on free, so every forward touches every
page of them for the first time again: millions of minor page faults per full-size forward,
a tenth of its CPU time in the kernel (``docs/performance.md`` has the figures). The
``retain`` policy tells glibc to serve all
blocks from its heap (``M_MMAP_MAX = 0``) and never to give the heap's free top back to
the kernel (``M_TRIM_THRESHOLD = -1``, which mallopt(3) documents as disabling trimming;
its largest positive value, 2**31 - 1, still trims whenever more than 2 GiB at the top is
free, as after every forward that peaks above that): later forwards reuse the same pages
(a few faults). The price is that
memory freed after a peak stays with the process until it exits, which is what a model
server or a batch job wants anyway.

The policy is process-wide and cannot be undone for memory already in use, so nothing in
this library applies it on import or on load: call :func:`apply_malloc_policy` once at the
start of the process. The ``export``, ``predict`` and ``bench`` commands do (``--malloc
default`` opts out; ``bench`` applies it in each job's own process). It changes no
numerics. It needs glibc's malloc (Linux); on another libc, or with another allocator
preloaded (jemalloc, tcmalloc: PyTorch's CPU tuning guide recommends those for the same
reason), it is reported as not applied and nothing changes.

:func:`peak_rss_bytes` is the process's peak memory, what every memory figure quotes.
"""

from __future__ import annotations

import ctypes
import logging
import os
import platform
import resource
import sys
from collections.abc import Callable
from typing import Any

__all__ = [
    "MALLOC_POLICIES",
    "apply_malloc_policy",
    "available_memory_bytes",
    "current_malloc_policy",
    "glibc_version",
    "peak_rss_bytes",
]

_log = logging.getLogger(__name__)

#: Policies :func:`apply_malloc_policy` accepts.
MALLOC_POLICIES = ("retain", "default")

# mallopt parameter numbers from glibc's <malloc.h>
# values are C ints; M_TRIM_THRESHOLD=-1 becomes SIZE_MAX inside glibc: never trim
_SETTINGS = (("M_MMAP_MAX", -4, 0), ("M_TRIM_THRESHOLD", -1, -1))

_applied: dict[str, Any] = {"policy": "default", "applied": False, "reason": "not requested"}


def _address(func: Any) -> int | None:
    return ctypes.cast(func, ctypes.c_void_p).value


def glibc_version() -> str | None:
    """The running C library's ``"glibc X.Y"``, or None when this process does not run on glibc."""
    try:
        return os.confstr("CS_GNU_LIBC_VERSION") or None
    except (AttributeError, ValueError, OSError):
        return None


def _mallopt() -> tuple[Callable[[int, int], int] | None, str]:
    """glibc's ``mallopt`` when this process allocates with glibc's malloc, else (None, why)."""
    version = glibc_version()
    if not version:
        return None, f"retain needs glibc; this process runs on {platform.system()} without it"
    try:
        libc = ctypes.CDLL("libc.so.6")
        process = ctypes.CDLL(None)
        mallopt = libc.mallopt
        interposed = _address(process.malloc) != _address(libc.malloc)
    except (OSError, AttributeError) as exc:
        return None, f"retain needs glibc's mallopt; it could not be loaded ({exc})"
    if interposed:
        return None, "malloc in this process is not glibc's (an allocator preloaded with LD_PRELOAD?)"
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return mallopt, version


def apply_malloc_policy(policy: str = "retain") -> dict[str, Any]:
    """Apply ``policy`` to this process's malloc and return what happened.

    ``"retain"``: serve every block from the heap and keep freed memory for reuse (see the
    module docstring). ``"default"``: change nothing (glibc's settings stay as the process
    started, or as an earlier call left them: a process cannot go back once memory was
    retained, and the earlier record is then kept).

    Returns ``{"policy", "applied", "reason"}``, plus ``"settings"`` (each ``mallopt``
    setting and whether glibc accepted it) once settings were tried. ``applied`` is True only
    when glibc accepted every setting; ``reason`` says why not otherwise. The same record is
    what :func:`current_malloc_policy` returns afterwards.

    Raises:
        ValueError: ``policy`` is not one of :data:`MALLOC_POLICIES`.
    """
    global _applied
    if policy not in MALLOC_POLICIES:
        raise ValueError(f"malloc policy: expected one of {list(MALLOC_POLICIES)}, got {policy!r}")
    if policy == "default":
        if not any(_applied.get("settings", {}).values()):
            _applied = {"policy": "default", "applied": False, "reason": "requested"}
        return dict(_applied)
    mallopt, detail = _mallopt()
    if mallopt is None:
        record: dict[str, Any] = {"policy": "default", "applied": False, "reason": detail}
        _log.info("malloc policy 'retain' not applied: %s", detail)
    else:
        settings = {name: mallopt(param, value) == 1 for name, param, value in _SETTINGS}
        refused = [name for name, ok in settings.items() if not ok]
        record = {
            "policy": "retain" if any(settings.values()) else "default",
            "applied": not refused,
            "reason": f"{detail}: mallopt M_MMAP_MAX=0, M_TRIM_THRESHOLD=-1"
            if not refused
            else f"{detail}: mallopt refused {', '.join(refused)}",
            "settings": settings,
        }
        if refused:
            _log.warning("malloc policy 'retain' not fully applied: %s", record["reason"])
    _applied = record
    return dict(record)


def current_malloc_policy() -> dict[str, Any]:
    """The record of the last :func:`apply_malloc_policy` call in this process."""
    return dict(_applied)


def available_memory_bytes() -> int | None:
    """Memory the kernel says new allocations can get without swapping (``MemAvailable``),
    or None where ``/proc/meminfo`` does not tell."""
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far, in bytes (``ru_maxrss``: KiB on Linux,
    bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) * (1 if sys.platform == "darwin" else 1024)
