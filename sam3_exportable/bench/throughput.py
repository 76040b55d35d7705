"""The bench's throughput section: :func:`~..batch.api.segment_images` over the same images
with the local engine and with Ray at 1 and 2 workers, each in its own fresh process.

Each configuration is ``(engine, workers, threads per worker)``; the plan gives them all the
same total thread count, so the Ray rows against the local row are Ray's overhead. Figures
per configuration: images per hour over the whole call (start-up included) and after the
first batch (steady state), seconds to the first batch, and the peak RSS of each worker
process (and of the driver).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from .stats import GIB

__all__ = ["image_folder", "job_throughput", "throughput_lines", "throughput_section"]


def image_folder(parent: str | Path, spec: dict[str, Any]) -> Path:
    """``parent/images`` with ``spec["images"]`` synthetic ``spec["image_size"]`` (height,
    width) PNG images, random pixels of ``spec["seed"]`` (default 0)."""
    import numpy as np
    from PIL import Image

    folder = Path(parent) / "images"
    folder.mkdir()
    height, width = (int(v) for v in spec["image_size"])
    rng = np.random.default_rng(int(spec.get("seed", 0)))
    for i in range(int(spec["images"])):
        Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(
            folder / f"{i:04d}.png"
        )
    return folder


def job_throughput(spec: dict[str, Any]) -> dict[str, Any]:
    """``segment_images`` of ``images`` synthetic ``image_size`` (height, width) images by
    ``phrases`` with the artifact ``path``, engine ``engine``, ``workers`` x ``threads``, one
    image per batch; outputs go to a temporary directory under ``work``."""
    from ..allocator import peak_rss_bytes
    from ..batch.api import segment_images

    with tempfile.TemporaryDirectory(dir=spec["work"]) as tmp:
        folder = image_folder(tmp, spec)
        summary = segment_images(
            [folder],
            list(spec["phrases"]),
            artifact=spec["path"],
            out=Path(tmp) / "out",
            engine=spec["engine"],
            workers=int(spec["workers"]) if spec["engine"] == "ray" else None,
            threads=int(spec["threads"]),
            batch_size=1,
            progress=False,
        )
    first = summary.first_result_seconds
    steady = None
    if first is not None and summary.written > 1 and summary.seconds > first:
        steady = (summary.written - 1) * 3600.0 / (summary.seconds - first)
    return {
        "images": summary.written,
        "failed": summary.failed,
        "seconds": summary.seconds,
        "first_result_s": first,
        "images_per_hour": summary.images_per_hour,
        "steady_images_per_hour": steady,
        "workers_used": summary.workers,
        "worker_peak_rss": sorted(summary.worker_peak_rss.values()),
        "driver_peak_rss": peak_rss_bytes(),
    }


def throughput_section(jobs: dict[str, Any], configs: list[tuple[str, int, int]]) -> dict[str, Any]:
    """One row per configuration (``key`` its job key), and the local row's time over each
    Ray row's (``speed_vs_local``; below 1 is Ray's overhead at the same total threads)."""
    from .plan import throughput_key

    rows = []
    for engine, workers, threads in configs:
        res = jobs.get(throughput_key(engine, workers, threads))
        row: dict[str, Any] = {"engine": engine, "workers": workers, "threads": threads}
        if not isinstance(res, dict) or "error" in res:
            row["error"] = res.get("error", "not run") if isinstance(res, dict) else "not run"
        else:
            row.update(
                {
                    k: res[k]
                    for k in ("images", "seconds", "first_result_s", "images_per_hour", "workers_used")
                }
            )
            row["steady_images_per_hour"] = res["steady_images_per_hour"]
            row["worker_peak_rss_gib"] = [v / GIB for v in res["worker_peak_rss"]]
            row["driver_peak_rss_gib"] = res["driver_peak_rss"] / GIB
        rows.append(row)
    local = next((r for r in rows if r["engine"] == "local" and "seconds" in r), None)
    for row in rows:
        if local is not None and row is not local and "seconds" in row:
            row["speed_vs_local"] = local["seconds"] / row["seconds"]
    return {"rows": rows}


def throughput_lines(section: dict[str, Any] | None) -> list[str]:
    """The Markdown of :func:`throughput_section` (empty when the run measured none)."""
    if not section or not section.get("rows"):
        return []

    def num(value: Any, fmt: str) -> str:
        return "-" if value is None else f"{value:{fmt}}"

    lines = [
        "",
        "## Throughput (segment_images, one image per batch)",
        "",
        "| engine | workers x threads | images | wall s | first batch s | images/h | images/h after "
        "the first batch | speed vs local | peak RSS per worker GiB | driver GiB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in section["rows"]:
        shape = f"{r['workers']} x {r['threads']}"
        if "seconds" not in r:
            lines.append(f"| {r['engine']} | {shape} | {r['error']} | | | | | | | |")
            continue
        workers = ", ".join(f"{v:.2f}" for v in r["worker_peak_rss_gib"])
        speed = "-" if r.get("speed_vs_local") is None else f"{r['speed_vs_local']:.2f}x"
        lines.append(
            f"| {r['engine']} | {shape} | {r['images']} | {r['seconds']:.1f} | "
            f"{num(r['first_result_s'], '.1f')} | {r['images_per_hour']:.0f} | "
            f"{num(r['steady_images_per_hour'], '.0f')} | {speed} | "
            f"{workers} | {r['driver_peak_rss_gib']:.2f} |"
        )
    used = [r for r in section["rows"] if "workers_used" in r and r["workers_used"] < r["workers"]]
    if used:
        lines.append(
            "\nWorkers that got no batch (Ray starts them in parallel; one may finish every batch "
            "before another is up): "
            + ", ".join(
                f"{r['engine']} {r['workers']} x {r['threads']}: {r['workers_used']} used" for r in used
            )
            + "."
        )
    return lines
