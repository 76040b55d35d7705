"""The bench's exemplar-box section: the box-capable program against the text-only one at
(1, 1), with K boxes per pair, and the geometry encoder's share of a forward.

Jobs, each in its own fresh process (keys in :mod:`.plan`):

- ``export/fp32-boxes``: the box-capable ``.pt2``, written by the export recipe;
- ``boxes/text-only``: the text-only ``.pt2`` at (1, 1), the reference of every ratio;
- ``boxes/padding``: the box-capable ``.pt2`` at (1, 1) called without boxes (it supplies
  one padding slot per pair);
- ``boxes/K=<k>``: the box-capable ``.pt2`` at (1, 1) with ``k`` valid boxes;
- ``boxes/geometry``: eager forwards at (1, 1) in each of those configurations, timing the
  geometry encoder inside each one (:func:`~.worker.job_geometry_share`).

The latency jobs run one after the other, so their ratios compare neighbouring runs.
"""

from __future__ import annotations

from typing import Any

import torch

from .plan import BOX_EXPORT, GEOMETRY_SHARE, box_latency_key
from .stats import GIB, stat

__all__ = ["box_configurations", "boxes_lines", "boxes_section", "synthetic_box_inputs"]


def synthetic_box_inputs(
    image_size: int, context_length: int, batch: int, prompts: int, boxes: int | str | None, seed: int = 1
) -> tuple[torch.Tensor, ...]:
    """:func:`~..artifact.program.synthetic_inputs` at (batch, prompts) for one configuration:
    ``None`` images and token ids only; ``"padding"`` with one padding slot per pair
    (:func:`~..contract.padding_boxes`, what a box-capable artifact supplies when called
    without boxes); a count ``K``: K boxes per pair, every one valid."""
    from ..artifact.program import synthetic_inputs
    from ..contract import padding_boxes

    if boxes is None or boxes == "padding":
        images, tokens = synthetic_inputs(image_size, context_length, batch, prompts, seed=seed)
        return (images, tokens) if boxes is None else (images, tokens, *padding_boxes(batch, prompts, images))
    images, tokens, coords, labels, valid = synthetic_inputs(
        image_size, context_length, batch, prompts, seed=seed, boxes=int(boxes)
    )
    return images, tokens, coords, labels, torch.ones_like(valid)


def box_configurations(counts: list[int]) -> list[tuple[str, int | str | None]]:
    """``(row name, configuration)`` of the section, in run order: the text-only program, the
    box-capable one without boxes, then one per count."""
    return [("text-only", None), ("padding", "padding"), *((str(k), k) for k in counts)]


def boxes_section(jobs: dict[str, Any], counts: list[int]) -> dict[str, Any]:
    """Rows ``text-only``, ``padding`` and one per count: the latency (:func:`.stats.stat` of
    the timed runs), its median's ratio to the text-only program's (``ratio_to_text_only``)
    and the geometry encoder's share of an eager forward in the same configuration; the
    export's time and audit. Empty when the plan had no counts."""
    if not counts:
        return {}
    geometry = (jobs.get(GEOMETRY_SHARE) or {}).get("by_configuration", {})
    rows: list[dict[str, Any]] = []
    for name, configuration in box_configurations(counts):
        res = jobs.get(box_latency_key(configuration if isinstance(configuration, int) else name))
        row: dict[str, Any] = {"boxes": configuration if isinstance(configuration, int) else name}
        if not isinstance(res, dict) or "error" in res or not res.get("seconds"):
            row["error"] = res.get("error", "not run") if isinstance(res, dict) else "not run"
        else:
            row["seconds"] = stat(res["seconds"])
            row["peak_rss_gib"] = res["peak_rss"] / GIB
        if name in geometry:
            row["geometry_share"] = stat(geometry[name]["share"])
            row["geometry_s"] = stat(geometry[name]["geometry_s"])
        rows.append(row)
    reference = rows[0].get("seconds")
    for row in rows:
        if reference and "seconds" in row:
            row["ratio_to_text_only"] = row["seconds"]["median"] / reference["median"]
    export = jobs.get(BOX_EXPORT) or {}
    section: dict[str, Any] = {"rows": rows}
    if "error" in export:
        section["export_error"] = export["error"]
    elif export:
        section["export_s"] = export.get("export_s")
        section["audit"] = export.get("audit")
    return section


def boxes_lines(section: dict[str, Any] | None) -> list[str]:
    """The Markdown of :func:`boxes_section` (empty when the run measured none)."""
    if not section or not section.get("rows"):
        return []
    lines = [
        "",
        "## Exemplar boxes (1 image x 1 phrase)",
        "",
        "| boxes per pair | latency s | vs text-only | geometry encoder share (eager) | peak RSS GiB |",
        "|---|---|---|---|---|",
    ]
    labels = {"text-only": "text-only program", "padding": "box program, no boxes (one padding slot)"}
    for r in section["rows"]:
        label = labels.get(str(r["boxes"]), f"K = {r['boxes']}")
        share = "-" if "geometry_share" not in r else f"{r['geometry_share']['median']:.2%}"
        if "seconds" not in r:
            lines.append(f"| {label} | {r['error']} | | {share} | |")
            continue
        ratio = r.get("ratio_to_text_only")
        lines.append(
            f"| {label} | {r['seconds']['median']:.2f} | {'-' if ratio is None else f'{ratio:.3f}x'} | "
            f"{share} | {r['peak_rss_gib']:.2f} |"
        )
    if section.get("export_error"):
        lines.append(f"\nThe box-capable export failed: {section['export_error']}.")
    elif section.get("export_s") is not None:
        lines.append(f"\nExport of the box-capable program: {section['export_s']:.1f} s.")
    return lines
