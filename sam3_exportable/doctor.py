"""``sam3-exportable doctor``: what each patch means for the installed torch and sam3."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from importlib.metadata import version

import torch

from .errors import UpstreamMismatchError
from .patch_set import default_context
from .patching import Patch, is_patched, resolve_target
from .upstream_patches import ALL_PATCHES

__all__ = ["DoctorRow", "doctor_rows", "format_table"]


@dataclasses.dataclass(frozen=True)
class DoctorRow:
    patch: str
    target: str
    needed: bool  # in the default set for this torch, device and export mode
    applied: bool  # active in this process right now
    upstream: str  # "needs patch", "fixed upstream" or "missing"
    fingerprint: str  # "ok" or "MISMATCH (<found> != <expected>)" or "-"


def doctor_rows(patches: Sequence[Patch] = ALL_PATCHES, *, strict: bool = False) -> list[DoctorRow]:
    ctx = default_context(strict=strict)
    rows = []
    for patch in patches:
        try:
            current = resolve_target(patch.target)[2]
            found = patch.current_fingerprint()
            source = patch.upstream_source()
        except (ImportError, AttributeError, UpstreamMismatchError):
            rows.append(DoctorRow(patch.name, patch.target, patch.needed(ctx), False, "missing", "-"))
            continue
        fixed = patch.fixed_upstream is not None and patch.fixed_upstream(source)
        rows.append(
            DoctorRow(
                patch=patch.name,
                target=patch.target,
                needed=patch.needed(ctx),
                applied=is_patched(current),
                upstream="fixed upstream" if fixed else "needs patch",
                fingerprint="ok"
                if found == patch.fingerprint
                else f"MISMATCH ({found} != {patch.fingerprint})",
            )
        )
    return rows


def format_table(rows: Sequence[DoctorRow]) -> str:
    header = ("patch", "needed here", "applied now", "upstream", "fingerprint")
    body = [
        (r.patch, "yes" if r.needed else "no", "yes" if r.applied else "no", r.upstream, r.fingerprint)
        for r in rows
    ]
    widths = [max(len(str(row[i])) for row in [header, *body]) for i in range(len(header))]
    lines = [
        f"torch {torch.__version__}, sam3 {version('sam3')}, CUDA available: {torch.cuda.is_available()}",
        "  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)),
        "  ".join("-" * w for w in widths),
    ]
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)) for row in body]
    return "\n".join(lines)
