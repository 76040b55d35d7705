"""The bench's serve section: ``sam3-exportable serve`` under concurrent HTTP clients, against
``predict`` over the same images at the same threads.

One job (``serve/load``, :func:`job_serve`, in a fresh process): synthetic images written
once; ``segment_images`` (the local engine, one image per batch, no mask or overlay files)
over them; then the server (one replica, the plan's threads), one warm-up request (the
first graph call is slower), and for each client count a load test of
``requests_per_client`` requests per client (:func:`~..serve.loadtest.run_load`):
requests/s, latency percentiles, mean batch size, errors by status; the replica's peak RSS and
the malloc policy its process applied.
"""

from __future__ import annotations

import base64
import tempfile
from pathlib import Path
from typing import Any

from .stats import GIB
from .throughput import image_folder

__all__ = ["SERVE_LOAD", "job_serve", "serve_lines", "serve_section"]

#: The job key of the section.
SERVE_LOAD = "serve/load"


def job_serve(spec: dict[str, Any]) -> dict[str, Any]:
    """See the module docstring. ``spec``: ``path`` (the artifact), ``threads``, ``images``,
    ``image_size`` (height, width), ``phrases``, ``clients`` (a list), ``requests_per_client``,
    ``work`` (a directory for temporary files), ``malloc``."""
    import httpx

    from ..batch.api import segment_images
    from ..serve.loadtest import run_load, served

    threads, phrases = int(spec["threads"]), list(spec["phrases"])
    with tempfile.TemporaryDirectory(dir=spec["work"]) as tmp:
        folder = image_folder(tmp, spec)
        predict = segment_images(
            [folder],
            phrases,
            artifact=spec["path"],
            out=Path(tmp) / "out",
            threads=threads,
            batch_size=1,
            masks=False,
            overlay=False,
            progress=False,
        )
        bodies = [
            {"image": base64.b64encode(p.read_bytes()).decode(), "prompts": phrases}
            for p in sorted(folder.iterdir())
        ]
        args = ["--threads", str(threads), "--malloc", str(spec.get("malloc", "retain"))]
        rows = []
        with served(spec["path"], args, Path(tmp) / "serve.log") as server:
            warmup = run_load(server.url, bodies[:1], clients=1, requests=1).summary()  # the first call
            for clients in spec["clients"]:
                count = int(clients) * int(spec["requests_per_client"])
                report = run_load(server.url, bodies, clients=int(clients), requests=count)
                rows.append(report.summary())
            replica = httpx.get(f"{server.url}/v1/model", timeout=60).json()["replica"]
            ready_s = server.ready_s
        stop_s = server.stop_s
    first = predict.first_result_seconds
    steady = None
    if first is not None and predict.written > 1 and predict.seconds > first:
        steady = (predict.written - 1) / (predict.seconds - first)
    return {
        "predict": {
            "images": predict.written,
            "seconds": predict.seconds,
            "first_result_s": first,
            "steady_images_per_s": steady,
        },
        "rows": rows,
        "warmup_ms": warmup["p50_ms"],
        "replica_peak_rss": replica["peak_rss_bytes"],
        "replica_malloc": replica["malloc"],
        "ready_s": ready_s,
        "stop_s": stop_s,
    }


def serve_section(jobs: dict[str, Any], clients: list[int]) -> dict[str, Any]:
    """The load test's rows, ``predict``'s images/s over the same images after its first
    image (its start-up excluded, as the server's is), and each row's requests/s over it
    (``vs_predict``). Empty when the plan has no client counts."""
    if not clients:
        return {}
    res = jobs.get(SERVE_LOAD)
    if not isinstance(res, dict) or "error" in res:
        return {"error": res.get("error", "not run") if isinstance(res, dict) else "not run"}
    predict = res["predict"]
    per_s = predict.get("steady_images_per_s") or 0.0
    rows = [{**row, "vs_predict": row["requests_per_s"] / per_s if per_s else None} for row in res["rows"]]
    return {
        "rows": rows,
        "predict_images_per_s": per_s,
        "replica_peak_rss_gib": res["replica_peak_rss"] / GIB,
        "replica_malloc": res.get("replica_malloc"),
        "ready_s": res["ready_s"],
        "stop_s": res["stop_s"],
    }


def serve_lines(section: dict[str, Any] | None) -> list[str]:
    """The Markdown of :func:`serve_section` (empty when the run measured none)."""
    if not section:
        return []
    head = ["", "## Serve: concurrent clients over loopback (one replica)", ""]
    if "error" in section:
        return [*head, f"Not measured: {section['error']}."]
    lines = [
        *head,
        "| clients | requests | requests/s | vs predict | p50 ms | p95 ms | p99 ms | mean batch | errors |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in section["rows"]:
        errors = ", ".join(f"{code}: {n}" for code, n in r["errors"].items()) or "none"
        ratio = "-" if r["vs_predict"] is None else f"{r['vs_predict']:.2f}x"
        lines.append(
            f"| {r['clients']} | {r['requests']} | {r['requests_per_s']:.3g} | {ratio} | {r['p50_ms']:.0f} | "
            f"{r['p95_ms']:.0f} | {r['p99_ms']:.0f} | {r['mean_batch_size']:.2f} | {errors} |"
        )
    lines.append(
        f"\n`predict` over the same images at the same threads, after its first image: "
        f"{section['predict_images_per_s']:.3g} images/s. Replica peak RSS "
        f"{section['replica_peak_rss_gib']:.2f} GiB; ready "
        f"{section['ready_s']:.1f} s after start, stopped {section['stop_s'] or 0:.1f} s after SIGTERM."
    )
    return lines
