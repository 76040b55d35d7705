"""The bench's exemplar-box section: the box-capable program against the text-only one at
(1, 1), with K boxes per pair, and the geometry encoder's share of a forward.

Jobs, each in its own fresh process (keys from :func:`box_latency_key` and the constants):

- ``export/fp32-boxes``: the box-capable ``.pt2``, written by the export recipe;
- ``boxes/text-only``: the text-only ``.pt2`` at (1, 1), the reference of every ratio;
- ``boxes/padding``: the box-capable ``.pt2`` at (1, 1) called without boxes (it supplies
  one padding slot per pair);
- ``boxes/K=<k>``: the box-capable ``.pt2`` at (1, 1) with ``k`` valid boxes;
- ``boxes/geometry``: the eager model at (1, 1) without boxes and with each ``k``, timing the
  geometry encoder inside each forward (forward hooks): its share of that forward.

The latency jobs run one after the other, so their ratios compare neighbouring runs.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch

__all__ = [
    "BOX_EXPORT",
    "GEOMETRY_SHARE",
    "box_inputs",
    "box_latency_key",
    "boxes_lines",
    "boxes_section",
    "job_geometry_share",
]

BOX_EXPORT = "export/fp32-boxes"
GEOMETRY_SHARE = "boxes/geometry"
#: File name (in the bench's work dir) of the box-capable artifact.
BOX_ARTIFACT = "sam3-boxes.pt2"


def box_latency_key(boxes: int | str) -> str:
    """``boxes/K=4`` for a box count, ``boxes/text-only`` or ``boxes/padding`` for the rest."""
    return f"boxes/K={boxes}" if isinstance(boxes, int) else f"boxes/{boxes}"


def box_inputs(
    image_size: int, context_length: int, batch: int, prompts: int, boxes: int | None, seed: int = 1
) -> tuple[torch.Tensor, ...]:
    """:func:`~..artifact.program.synthetic_inputs` at (batch, prompts), with ``boxes`` boxes
    per pair every one of them valid (``None``: images and token ids only)."""
    from ..artifact.program import synthetic_inputs

    inputs = synthetic_inputs(image_size, context_length, batch, prompts, seed=seed, boxes=boxes)
    if boxes is None:
        return inputs
    images, tokens, coords, labels, valid = inputs
    return images, tokens, coords, labels, torch.ones_like(valid)


def job_geometry_share(spec: dict[str, Any]) -> dict[str, Any]:
    """Eager forwards at (1, 1): one warm-up, then for ``None`` (no boxes) and each count of
    ``counts`` one timed forward, with the seconds spent inside ``model.geometry_encoder``."""
    from ..export.builders import build_model
    from ..export.pipeline import FullSam3PipelineWrapper
    from ..patching.selection import exportable_sam3

    wrapper = FullSam3PipelineWrapper(build_model(spec["size"], seed=int(spec.get("seed", 0)))).eval()
    encoder = wrapper.model.geometry_encoder
    inside: list[float] = []
    started: list[float] = []
    encoder.register_forward_pre_hook(lambda *_: started.append(time.perf_counter()))
    encoder.register_forward_hook(lambda *_: inside.append(time.perf_counter() - started.pop()))

    def forward(count: int | None) -> dict[str, float]:
        inputs = box_inputs(wrapper.image_size, wrapper.context_length, 1, 1, count)
        inside.clear()
        start = time.perf_counter()
        with torch.inference_mode(), exportable_sam3():
            wrapper(*inputs)
        total = time.perf_counter() - start
        return {"forward_s": total, "geometry_s": sum(inside), "share": sum(inside) / total}

    counts: list[int | None] = [None, *(int(k) for k in spec["counts"])]
    forward(counts[-1])  # warm-up: first-touch allocations land here, not in a timed forward
    return {"by_boxes": {"none" if k is None else str(k): forward(k) for k in counts}}


def _median(res: Any) -> float | None:
    if isinstance(res, dict) and "error" not in res and res.get("seconds"):
        return float(statistics.median(res["seconds"]))
    return None


def boxes_section(jobs: dict[str, Any], counts: list[int]) -> dict[str, Any]:
    """Rows ``text-only``, ``padding`` and one per count: the median latency, its ratio to the
    text-only program (``ratio_to_text_only``) and the geometry encoder's share of an eager
    forward with as many boxes; the export's time and audit. Empty when the plan had none."""
    if not counts:
        return {}
    geometry = (jobs.get(GEOMETRY_SHARE) or {}).get("by_boxes", {})
    reference = _median(jobs.get(box_latency_key("text-only")))
    rows = []
    for name, geometry_key in [("text-only", None), ("padding", "none"), *((k, str(k)) for k in counts)]:
        res = jobs.get(box_latency_key(name))
        row: dict[str, Any] = {"boxes": name}
        median = _median(res)
        if median is None:
            row["error"] = res.get("error", "not run") if isinstance(res, dict) else "not run"
        else:
            row["seconds"] = median
            row["peak_rss_gib"] = res["peak_rss"] / float(1 << 30)
            if reference:
                row["ratio_to_text_only"] = median / reference
        if geometry_key in geometry:
            row["geometry_share"] = geometry[geometry_key]["share"]
            row["geometry_s"] = geometry[geometry_key]["geometry_s"]
        rows.append(row)
    export = jobs.get(BOX_EXPORT) or {}
    section: dict[str, Any] = {"rows": rows}
    if "error" in export:
        section["export_error"] = export["error"]
    elif export:
        section["export_s"] = export.get("export_s")
        section["audit"] = export.get("audit")
    if isinstance(geometry.get("none"), dict):
        section["eager_forward_s_without_boxes"] = geometry["none"]["forward_s"]
    return section


def boxes_lines(section: dict[str, Any] | None) -> list[str]:
    """The Markdown of :func:`boxes_section` (empty when the run measured none)."""
    if not section or not section.get("rows"):
        return []

    def num(value: Any, fmt: str) -> str:
        return "-" if value is None else f"{value:{fmt}}"

    lines = [
        "",
        "## Exemplar boxes (1 image x 1 phrase)",
        "",
        "| boxes per pair | latency s | vs text-only | geometry encoder share (eager) | peak RSS GiB |",
        "|---|---|---|---|---|",
    ]
    for r in section["rows"]:
        label = {"text-only": "text-only program", "padding": "box program, no boxes"}.get(
            str(r["boxes"]), f"K = {r['boxes']}"
        )
        if "seconds" not in r:
            lines.append(f"| {label} | {r['error']} | | | |")
            continue
        ratio = r.get("ratio_to_text_only")
        share = r.get("geometry_share")
        lines.append(
            f"| {label} | {r['seconds']:.2f} | {num(ratio, '.3f')}{'x' if ratio else ''} | "
            f"{'-' if share is None else f'{share:.2%}'} | {r['peak_rss_gib']:.2f} |"
        )
    if section.get("export_error"):
        lines.append(f"\nThe box-capable export failed: {section['export_error']}.")
    elif section.get("export_s") is not None:
        lines.append(f"\nExport of the box-capable program: {section['export_s']:.1f} s.")
    return lines
