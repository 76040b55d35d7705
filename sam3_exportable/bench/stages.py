"""The bench's stages section: one image asked several phrases in turn, as a labelling tool
asks them, through a staged ``.pt2`` with the image-feature cache and without it.

Jobs, each in its own fresh process (keys in :mod:`.plan`):

- ``export/fp32-staged`` (and ``export/bf16-staged``): the staged ``.pt2`` (``--stages``),
  written by the export recipe;
- ``stages/fp32`` (and ``stages/bf16``): :func:`~.worker.job_follow_up`: a warm-up on
  another image, then the phrases one call each with the cache (the first call encodes the
  image, the others run the prompt stage alone), then the same calls without a cache (each
  encodes the image again).
"""

from __future__ import annotations

from typing import Any

from .plan import follow_up_key, staged_export_key
from .stats import GIB, stat

__all__ = ["stages_lines", "stages_section"]


def stages_section(jobs: dict[str, Any], autocasts: list[str]) -> dict[str, Any]:
    """One row per autocast: the first call (image encoded), the follow-up calls on the
    cached image (:func:`.stats.stat`), their ratio, and the whole sequence of phrases with
    and without the cache; the staged export's time and size. Empty without autocasts."""
    rows: list[dict[str, Any]] = []
    for autocast in autocasts:
        res = jobs.get(follow_up_key(autocast))
        export = jobs.get(staged_export_key(autocast)) or {}
        row: dict[str, Any] = {"autocast": autocast}
        if "error" in export:
            row["error"] = f"export failed: {export['error']}"
        elif not isinstance(res, dict) or "error" in res or not res.get("cached_s"):
            row["error"] = res.get("error", "not run") if isinstance(res, dict) else "not run"
        else:
            cached, uncached = res["cached_s"], res["uncached_s"]
            row["first_s"] = cached[0]
            row["follow_up_s"] = stat(cached[1:])
            row["follow_up_speedup"] = cached[0] / row["follow_up_s"]["median"]
            row["phrases"] = len(cached)
            row["sequence_cached_s"] = sum(cached)
            row["sequence_uncached_s"] = sum(uncached)
            row["sequence_speedup"] = sum(uncached) / sum(cached)
            row["peak_rss_gib"] = res["peak_rss"] / GIB
            row["export_s"] = export.get("export_s")
            row["size_bytes"] = export.get("size_bytes")
        rows.append(row)
    return {"rows": rows} if rows else {}


def stages_lines(section: dict[str, Any] | None) -> list[str]:
    """The Markdown of :func:`stages_section` (empty when the run measured none)."""
    if not section or not section.get("rows"):
        return []
    lines = [
        "",
        "## Stages: one image, phrases asked in turn (staged .pt2, feature cache)",
        "",
        "| program | first call s | follow-up s (cached image) | first / follow-up | "
        "phrases | sequence cached s | sequence uncached s | uncached / cached | peak RSS GiB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in section["rows"]:
        name = "fp32" if r["autocast"] == "none" else r["autocast"]
        if "first_s" not in r:
            lines.append(f"| {name} | {r['error']} | | | | | | | |")
            continue
        lines.append(
            f"| {name} | {r['first_s']:.2f} | {r['follow_up_s']['median']:.2f} | "
            f"{r['follow_up_speedup']:.1f}x | {r['phrases']} | {r['sequence_cached_s']:.1f} | "
            f"{r['sequence_uncached_s']:.1f} | {r['sequence_speedup']:.1f}x | {r['peak_rss_gib']:.2f} |"
        )
    return lines
