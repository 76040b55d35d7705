"""``sam3-exportable doctor``: what each patch means for the installed torch and sam3."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from importlib.metadata import version

import torch

from ..errors import UpstreamMismatchError
from .engine import Patch, is_patched, resolve_target
from .selection import default_context
from .upstream import ALL_PATCHES

__all__ = ["TESTED_TORCH", "DoctorRow", "doctor_rows", "format_table", "torch_note"]

#: (torch, torchvision) releases the whole fast tier is tested on (``scripts/test_torch.sh``
#: runs it against any other pair); the README's "Tested versions" names the same.
TESTED_TORCH: tuple[tuple[str, str], ...] = (("2.14.1", "0.29.1"), ("2.15.0", "0.29.2"))


@dataclasses.dataclass(frozen=True)
class DoctorRow:
    patch: str
    target: str
    needed: bool  # in the default set for a .pt2 export in this process
    needed_onnx: bool  # in the default set for an ONNX export in this process
    applied: bool  # installed in this process right now
    upstream: str  # "needs patch", "fixed upstream" or "missing"
    fingerprint: str  # "ok" or "MISMATCH (<found> != <expected>)" or "-"


def doctor_rows(patches: Sequence[Patch] = ALL_PATCHES) -> list[DoctorRow]:
    """One row per patch: whether this process needs it (for a ``.pt2`` and for an ONNX
    export), whether it is installed now, and whether upstream still matches it."""
    pt2, onnx = default_context(export_target="pt2"), default_context(export_target="onnx")
    rows = []
    for patch in patches:
        needed = (patch.needed(pt2), patch.needed(onnx))
        try:
            current = resolve_target(patch.target)[2]
            found = patch.current_fingerprint()
            source = patch.upstream_source()
        except (ImportError, AttributeError, UpstreamMismatchError):
            rows.append(DoctorRow(patch.name, patch.target, *needed, False, "missing", "-"))
            continue
        fixed = patch.fixed_upstream is not None and patch.fixed_upstream(source)
        rows.append(
            DoctorRow(
                patch=patch.name,
                target=patch.target,
                needed=needed[0],
                needed_onnx=needed[1],
                applied=is_patched(current),
                upstream="fixed upstream" if fixed else "needs patch",
                fingerprint="ok"
                if found == patch.fingerprint
                else f"MISMATCH ({found} != {patch.fingerprint})",
            )
        )
    return rows


def _release(text: str) -> str:
    """``2.14.1+cu130`` -> ``2.14.1`` (the local build tag is not part of the release)."""
    return text.split("+", 1)[0]


def torch_note(torch_version: str, vision_version: str) -> str:
    """One line saying whether this torch/torchvision pair is one of :data:`TESTED_TORCH`."""
    pair = (_release(torch_version), _release(vision_version))
    tested = ", ".join(f"torch {t} / torchvision {v}" for t, v in TESTED_TORCH)
    if pair in TESTED_TORCH:
        return f"tested versions ({tested}): this is one of them"
    return (
        f"torch {pair[0]} / torchvision {pair[1]} is outside the tested versions ({tested}): "
        "the fingerprints below say whether the patches still match; "
        f"bash scripts/test_torch.sh {pair[0]} {pair[1]} runs the fast tier against it"
    )


def format_table(rows: Sequence[DoctorRow]) -> str:
    header = ("patch", "needed for .pt2", "needed for ONNX", "applied now", "upstream", "fingerprint")

    def yes(flag: bool) -> str:
        return "yes" if flag else "no"

    body = [
        (r.patch, yes(r.needed), yes(r.needed_onnx), yes(r.applied), r.upstream, r.fingerprint) for r in rows
    ]
    widths = [max(len(str(row[i])) for row in [header, *body]) for i in range(len(header))]
    lines = [
        f"torch {torch.__version__}, sam3 {version('sam3')}, CUDA available: {torch.cuda.is_available()}",
        torch_note(torch.__version__, version("torchvision")),
        "  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)),
        "  ".join("-" * w for w in widths),
    ]
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)) for row in body]
    return "\n".join(lines)
