"""PNG plots of a bench ``results.json`` (matplotlib, no display needed).

``write_plots(doc, out_dir)`` writes, for whatever the results hold:

* ``latency_scaling.png``: exported ``.pt2`` latency (median, min-max bars) versus P at
  B=1 and versus B at P=1, with the linear fits;
* ``memory_scaling.png``: peak RSS versus P and versus B, with the fits;
* ``variants.png``: eager, exported, AOTInductor and bf16 latency per shape (bars).

Returns the names of the files written.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..artifact.files import atomic_write
from .stats import linear_fit

__all__ = ["write_plots"]

_COLOURS = {"eager": "#4c72b0", "exported": "#55a868", "aoti": "#c44e52", "bf16": "#8172b2"}


def _save(fig: Any, path: Path) -> None:
    with atomic_write(path, force=True) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")


def _series(ax: Any, points: list[dict[str, Any]], axis: str, field: str, label: str, unit: str) -> None:
    if not points:
        ax.text(0.5, 0.5, "no points measured", ha="center", va="center", transform=ax.transAxes)
        return
    xs = [pt[axis] for pt in points]
    med = [pt[field]["median"] for pt in points]
    lo = [m - pt[field]["min"] for m, pt in zip(med, points, strict=True)]
    hi = [pt[field]["max"] - m for m, pt in zip(med, points, strict=True)]
    ax.errorbar(xs, med, yerr=[lo, hi], fmt="o", capsize=3, label="measured (median, min-max)")
    if len(set(xs)) >= 2:
        fit = linear_fit(xs, med)
        if fit:
            grid = [min(xs), max(xs)]
            ax.plot(
                grid,
                [fit["intercept"] + fit["slope"] * x for x in grid],
                "--",
                label=f"fit: {fit['slope']:.3g} {unit} per extra {label}",
            )
    ax.set_xlabel(axis)
    ax.set_ylabel(unit)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def write_plots(doc: dict[str, Any], out_dir: str | Path) -> list[str]:
    """Write the plots of ``doc`` (a bench results dict) into ``out_dir``; return file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    title = f"SAM3 {doc.get('size')} ({doc.get('machine', {}).get('cpu_model', 'CPU')}, " + (
        f"{doc.get('machine', {}).get('torch_threads')} threads)"
    )
    written = []
    scaling = doc.get("scaling", {})
    for name, field, unit in (
        ("latency_scaling.png", "seconds", "s"),
        ("memory_scaling.png", "peak_rss_gib", "GiB"),
    ):
        fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
        _series(left, scaling.get("prompts_at_B1", []), "P", field, "prompt", unit)
        left.set_title(f"exported .pt2, B=1: {'latency' if field == 'seconds' else 'peak RSS'} vs P")
        _series(right, scaling.get("batches_at_P1", []), "B", field, "image", unit)
        right.set_title(f"exported .pt2, P=1: {'latency' if field == 'seconds' else 'peak RSS'} vs B")
        fig.suptitle(title, fontsize=9)
        _save(fig, out / name)
        plt.close(fig)
        written.append(name)

    rows = [r for r in doc.get("latency", []) if "seconds" in r]
    shapes = sorted({(r["B"], r["P"]) for r in rows}, key=lambda s: (s[0] * s[1], s))
    variants = [v for v in ("eager", "exported", "aoti", "bf16") if any(r["variant"] == v for r in rows)]
    fig, ax = plt.subplots(figsize=(9, 4.5))
    width = 0.8 / max(1, len(variants))
    for i, variant in enumerate(variants):
        xs, med, err_lo, err_hi = [], [], [], []
        for j, shape in enumerate(shapes):
            row = next((r for r in rows if r["variant"] == variant and (r["B"], r["P"]) == shape), None)
            if row is None:
                continue
            s = row["seconds"]
            xs.append(j + (i - (len(variants) - 1) / 2) * width)
            med.append(s["median"])
            err_lo.append(s["median"] - s["min"])
            err_hi.append(s["max"] - s["median"])
        ax.bar(xs, med, width, yerr=[err_lo, err_hi], capsize=3, label=variant, color=_COLOURS.get(variant))
    ax.set_xticks(range(len(shapes)), [f"B={b}, P={p}" for b, p in shapes])
    ax.set_ylabel("latency, s (median; bars min-max)")
    ax.set_title(title, fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    ax.legend()
    _save(fig, out / "variants.png")
    plt.close(fig)
    written.append("variants.png")
    return written
