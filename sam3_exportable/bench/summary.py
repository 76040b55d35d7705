"""From the raw job results of a bench run to its summary sections and targets (pure).

Every function takes the ``jobs`` dict of ``results.json`` (and the plan, and where needed a
way to read saved outputs) and returns JSON-ready sections; :func:`summarize` fills them all
into the results document.
"""

from __future__ import annotations

import operator
import statistics
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ..verify import compare_parity
from .boxes import boxes_section
from .online import serve_section
from .plan import (
    ALLOCATOR_BASELINE,
    AOTI_COMPILE,
    IMPORTS,
    MATMUL_PEAK,
    ONNX_EXPORT,
    ONNX_VARIANTS,
    BenchPlan,
    export_key,
    latency_key,
    outputs_name,
    scaling_key,
)
from .stages import stages_section
from .stats import linear_fit, stat
from .throughput import throughput_section

__all__ = ["TARGET_COMPARISONS", "summarize"]

GIB = float(1 << 30)

#: The comparisons a target's bound may use ("<op> <bound>" in ``doc["targets"]``).
TARGET_COMPARISONS = {"<=": operator.le, ">=": operator.ge, "<": operator.lt}

#: Reads a saved outputs file of the work dir by name; None when it does not exist.
OutputsReader = Callable[[str], "Sequence[torch.Tensor] | None"]

_ALL_HOSTS = "all hosts"
_BF16_HOSTS = "hosts with native bf16 (avx512_bf16 or amx_bf16)"


def _ok(res: Any) -> bool:
    return isinstance(res, dict) and "error" not in res


def matmul_peaks(jobs: dict[str, Any]) -> dict[str, Any]:
    peaks = jobs.get(MATMUL_PEAK, {})
    return {
        key: stat(peaks[dt]["gflops"])
        for key, dt in (("fp32", "float32"), ("bf16", "bfloat16"))
        if dt in peaks
    }


def export_section(jobs: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for autocast in ("none", "bf16"):
        res = jobs.get(export_key(autocast))
        if _ok(res):
            out["fp32" if autocast == "none" else autocast] = {
                "build_s": stat([res["build_s"]]),
                "export_s": stat([res["export_s"]]),
                "save_s": stat([res["save_s"]]),
                "peak_rss_gib": stat([res["peak_rss"] / GIB]),
                "size_mib": res["size_bytes"] / 2**20,
                "graph_nodes": res["nodes"],
                "audit": res["audit"],
            }
    return out


def aoti_section(jobs: dict[str, Any], plan: BenchPlan) -> dict[str, Any]:
    res = jobs.get(AOTI_COMPILE)
    if _ok(res):
        return {
            "compile_s": stat([res["compile_s"]]),
            "peak_rss_gib": stat([res["peak_rss"] / GIB]),
            "size_mib": res["size_bytes"] / 2**20,
            "inductor_configs": res["inductor_configs"],
        }
    return {"skipped": "--quick" if not plan.aoti else "compile failed"}


def load_section(jobs: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if jobs.get(IMPORTS):
        out["import_torch_s"] = stat([r["torch_s"] for r in jobs[IMPORTS]])
        out["import_torchvision_s"] = stat([r["torchvision_s"] for r in jobs[IMPORTS]])
    for how in ("read", "pt2", "pt2-torch", "aoti"):
        runs = [res for key, res in jobs.items() if key.startswith(f"load/{how}/") and _ok(res)]
        if runs:
            out[how.replace("-", "_")] = {
                "seconds": stat([r["seconds"] for r in runs]),
                "peak_rss_gib": stat([r["peak_rss"] / GIB for r in runs]),
            }
    return out


def _median(res: dict[str, Any] | None) -> float | None:
    return statistics.median(res["seconds"]) if _ok(res) and res.get("seconds") else None


def latency_rows(jobs: dict[str, Any], plan: BenchPlan, peaks: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per (variant, shape) of the plan's matrix: latency, ratios to eager and to the
    variant's own B=1 time, FLOP/s and the fraction of the matmul peak of its dtype."""
    flops = {}
    for variant, shapes in plan.matrix.items():
        for b, p in shapes:
            res = jobs.get(latency_key(variant, b, p), {})
            if isinstance(res, dict) and "flops" in res:
                flops.setdefault((b, p), res["flops"])
    rows = []
    for b, p in plan.shapes:
        eager = _median(jobs.get(latency_key("eager", b, p)))
        for variant, shapes in plan.matrix.items():
            if (b, p) not in shapes:
                continue
            res = jobs.get(latency_key(variant, b, p))
            if not _ok(res) or not res.get("seconds"):
                error = res.get("error", "not run") if isinstance(res, dict) else "not run"
                rows.append({"variant": variant, "B": b, "P": p, "error": error})
                continue
            median = statistics.median(res["seconds"])
            row: dict[str, Any] = {
                "variant": variant,
                "B": b,
                "P": p,
                "seconds": stat(res["seconds"]),
                "warmup_s": res.get("warmup_s", []),
                "load_s": res["load_s"],
                "rss_after_load_gib": res["rss_after_load"] / GIB,
                "peak_rss_gib": stat([res["peak_rss"] / GIB]),
                "minor_faults_per_run": res.get("minor_faults_per_run"),
                "system_s_per_run": res.get("system_s_per_run"),
            }
            if eager:
                row["ratio_to_eager"] = median / eager
                row["speedup_vs_eager"] = eager / median
            single = _median(jobs.get(latency_key(variant, 1, p)))
            if single and b > 1:
                row["ratio_to_B1"] = median / single
            if (b, p) in flops:
                row["flops"] = flops[(b, p)]
                row["achieved_gflops"] = flops[(b, p)] / median / 1e9
                peak_key = "bf16" if variant == "bf16" else "fp32"
                if peak_key in peaks:
                    row["fraction_of_matmul_peak"] = row["achieved_gflops"] / peaks[peak_key]["median"]
                    row["matmul_peak_used"] = peak_key
            rows.append(row)
    return rows


def allocator_section(jobs: dict[str, Any], plan: BenchPlan, read_outputs: OutputsReader) -> dict[str, Any]:
    """Whether the plan's malloc policy held in every job, and eager at (1,1) under it and
    with malloc's settings unchanged (``--malloc default``)."""
    records = [
        job["malloc"]
        for key, job in jobs.items()
        if isinstance(job, dict) and "malloc" in job and not key.startswith("allocator/")
    ]
    out: dict[str, Any] = {
        "policy": plan.malloc,
        "applied_in_every_job": bool(records) and all(r["applied"] for r in records),
        "reasons": sorted({r["reason"] for r in records}),
    }
    for name, key in (("with_policy", latency_key("eager", 1, 1)), ("with_default", ALLOCATOR_BASELINE)):
        res = jobs.get(key)
        if _ok(res) and res.get("seconds"):
            out[name] = {
                "seconds": stat(res["seconds"]),
                "applied": res.get("malloc", {}).get("applied"),
                "minor_faults_per_run": res.get("minor_faults_per_run"),
                "system_s_per_run": res.get("system_s_per_run"),
                "peak_rss_gib": res["peak_rss"] / GIB,
            }
    if "with_policy" in out and "with_default" in out:
        out["speedup"] = out["with_default"]["seconds"]["median"] / out["with_policy"]["seconds"]["median"]
        pair = [read_outputs(outputs_name("eager", 1, 1, tag)) for tag in ("", "-default-malloc")]
        if all(o is not None for o in pair):
            out["outputs_bitwise_equal"] = all(compare_parity(*pair)["bitwise"].values())  # type: ignore[misc]
    return out


def onnx_section(jobs: dict[str, Any], rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The ONNX export (stage times, peak RSS, sizes) and, per shape the ONNX graph ran at,
    its latency and peak RSS next to the int8 graph, the ``.pt2`` and eager: the int8
    speed-up over the fp32 graph and the graph's peak RSS against the ``.pt2``'s."""
    res = jobs.get(ONNX_EXPORT)
    if not _ok(res):
        return {} if res is None else {"error": res.get("error")}
    out: dict[str, Any] = {
        "export": {
            stage: res[f"{stage}_s"]
            for stage in ("build", "export", "audit", "onnx", "quantize")
            if f"{stage}_s" in res
        },
        "export_peak_rss_gib": res["peak_rss"] / GIB,
        "peak_rss_after_gib": {
            key[len("peak_rss_after_") :]: value / GIB
            for key, value in res.items()
            if key.startswith("peak_rss_after_")
        },
        "sizes_mib": {kind: size / 2**20 for kind, size in res.get("sizes_bytes", {}).items()},
    }
    by = {(r["variant"], r["B"], r["P"]): r for r in rows if "seconds" in r}
    shapes = sorted({(b, p) for v, b, p in by if v in ONNX_VARIANTS}, key=lambda s: (s[0] * s[1], s))
    out["rows"] = []
    for b, p in shapes:
        row: dict[str, Any] = {"B": b, "P": p}
        for variant in ("eager", "exported", *ONNX_VARIANTS):
            if (variant, b, p) in by:
                row[variant] = {
                    "seconds": by[(variant, b, p)]["seconds"]["median"],
                    "peak_rss_gib": by[(variant, b, p)]["peak_rss_gib"]["max"],
                }
        if "onnx" in row and "onnx-int8" in row:
            row["int8_speedup_vs_onnx"] = row["onnx"]["seconds"] / row["onnx-int8"]["seconds"]
        if "onnx" in row and "exported" in row:
            row["onnx_peak_rss_vs_pt2"] = row["onnx"]["peak_rss_gib"] / row["exported"]["peak_rss_gib"]
        out["rows"].append(row)
    return out


def parity_section(plan: BenchPlan, read_outputs: OutputsReader) -> dict[str, Any]:
    """Each variant against eager at (1,1) (bf16 against fp32 eager), and the int8 ONNX graph
    against the fp32 one."""
    out: dict[str, Any] = {"shape": [1, 1]}
    reference = read_outputs(outputs_name("eager", 1, 1))
    if reference is None:
        return out
    for variant in plan.variants:
        if variant == "eager":
            continue
        other = read_outputs(outputs_name(variant, 1, 1))
        if other is not None:
            key = "bf16_vs_fp32_eager" if variant == "bf16" else f"{variant}_vs_eager"
            out[key] = compare_parity(reference, other)
    graph, int8 = (read_outputs(outputs_name(v, 1, 1)) for v in ONNX_VARIANTS)
    if graph is not None and int8 is not None:
        out["onnx-int8_vs_onnx"] = compare_parity(graph, int8)
    return out


def scaling_section(jobs: dict[str, Any], plan: BenchPlan, skipped: list[dict[str, Any]]) -> dict[str, Any]:
    def point(b: int, p: int) -> dict[str, Any] | None:
        for key in (latency_key("exported", b, p), scaling_key(b, p)):
            res = jobs.get(key)
            if _ok(res) and res.get("seconds"):
                return {
                    "B": b,
                    "P": p,
                    "seconds": stat(res["seconds"]),
                    "peak_rss_gib": stat([res["peak_rss"] / GIB]),
                    "runs": len(res["seconds"]),
                    "warmup": len(res.get("warmup_s", [])),
                    "source": key.split("/")[0],
                }
        return None

    prompts = sorted({1, *plan.scaling_prompts})
    batches = sorted({1, *plan.scaling_batches})
    by_p = [pt for p in prompts if (pt := point(1, p))]
    by_b = [pt for b in batches if (pt := point(b, 1))]

    def slope(points: list[dict[str, Any]], axis: str, field: str) -> float | None:
        fit = linear_fit([pt[axis] for pt in points], [pt[field]["median"] for pt in points])
        return fit and fit["slope"]

    return {
        "variant": "exported",
        "budget_s": plan.scaling_budget_s,
        "prompts_at_B1": by_p,
        "batches_at_P1": by_b,
        "skipped": skipped,
        "seconds_per_extra_prompt": slope(by_p, "P", "seconds"),
        "gib_per_extra_prompt": slope(by_p, "P", "peak_rss_gib"),
        "seconds_per_extra_image": slope(by_b, "B", "seconds"),
        "gib_per_extra_image": slope(by_b, "B", "peak_rss_gib"),
    }


def targets(doc: dict[str, Any], plan: BenchPlan) -> list[dict[str, Any]]:
    """The project's speed and memory targets, each with the hosts it applies to, its
    measured value (None: not measured) and its verdict (None: not measured, or not
    applicable on this host)."""
    rows = {(r["variant"], r["B"], r["P"]): r for r in doc["latency"] if "seconds" in r}

    def field(variant: str, b: int, p: int, key: str) -> float | None:
        return rows.get((variant, b, p), {}).get(key)

    aoti = doc.get("aoti", {})
    load = doc["load"].get("pt2")
    p32 = next((pt for pt in doc["scaling"]["prompts_at_B1"] if pt["P"] == 32), None)
    # (name, comparison, bound as written in the issue, measured value, unit, applies to)
    specs: list[tuple[str, str, str, float | None, str, str]] = [
        (
            f"exported latency / eager at ({b},{p})",
            "<=",
            "1.00",
            field("exported", b, p, "ratio_to_eager"),
            "x",
            _ALL_HOSTS,
        )
        for b, p in plan.matrix.get("eager", [])
        if (b, p) in plan.matrix.get("exported", [])
    ]
    for variant, hosts in (("exported", _ALL_HOSTS), ("bf16", _BF16_HOSTS)):
        for b, bound in ((2, "2.05"), (4, "4.1")):
            if (b, 1) in plan.matrix.get(variant, []):
                specs.append(
                    (
                        f"{variant} time(B={b}) / time(B=1), P=1",
                        "<=",
                        bound,
                        field(variant, b, 1, "ratio_to_B1"),
                        "x",
                        hosts,
                    )
                )
    specs += [
        (
            "bf16 .pt2 speed-up over fp32 eager at (1,1)",
            ">=",
            "2.5",
            field("bf16", 1, 1, "speedup_vs_eager"),
            "x",
            _BF16_HOSTS,
        ),
        (
            "bf16 .pt2 forward, fraction of the bf16 matmul peak at (1,1)",
            ">=",
            "0.75",
            field("bf16", 1, 1, "fraction_of_matmul_peak"),
            "",
            _BF16_HOSTS,
        ),
        (
            "exported .pt2 forward, fraction of the fp32 matmul peak at (1,1)",
            ">=",
            "0.75",
            field("exported", 1, 1, "fraction_of_matmul_peak"),
            "",
            _ALL_HOSTS,
        ),
        (
            "AOTInductor speed-up over eager at (1,1)",
            ">=",
            "1.1",
            field("aoti", 1, 1, "speedup_vs_eager"),
            "x",
            _ALL_HOSTS,
        ),
        (
            "AOTInductor compile time",
            "<",
            "360",
            aoti["compile_s"]["median"] if "compile_s" in aoti else None,
            "s",
            _ALL_HOSTS,
        ),
        (
            "fresh-process load of the .pt2 (load_pipeline)",
            "<=",
            "10",
            load and load["seconds"]["median"],
            "s",
            _ALL_HOSTS,
        ),
        ("peak RSS at B=1, P=32", "<=", "16", p32 and p32["peak_rss_gib"]["max"], "GiB", _ALL_HOSTS),
    ]
    onnx_at_23 = next((r for r in doc.get("onnx", {}).get("rows", []) if (r["B"], r["P"]) == (2, 3)), {})
    specs.append(
        (
            "ONNX peak RSS / .pt2 peak RSS at (2,3)",
            "<=",
            "1.3",
            onnx_at_23.get("onnx_peak_rss_vs_pt2"),
            "x",
            _ALL_HOSTS,
        )
    )
    native = bool(doc.get("machine", {}).get("bf16_native"))
    out = []
    for name, op, bound, measured, unit, hosts in specs:
        applicable = hosts == _ALL_HOSTS or native
        met = None if measured is None or not applicable else TARGET_COMPARISONS[op](measured, float(bound))
        row = {
            "name": name,
            "target": f"{op} {bound}",
            "measured": measured,
            "unit": unit,
            "applies_to": hosts,
            "applicable": applicable,
            "met": met,
        }
        if not applicable:
            row["note"] = "not applicable here: this host has no native bf16"
        out.append(row)
    return out


def summarize(doc: dict[str, Any], plan: BenchPlan, read_outputs: OutputsReader) -> dict[str, Any]:
    """Fill every summary section of ``doc`` (a results document with ``jobs``); return it."""
    jobs = doc["jobs"]
    doc["matmul_peak_gflops"] = matmul_peaks(jobs)
    doc["export"] = export_section(jobs)
    doc["aoti"] = aoti_section(jobs, plan)
    doc["load"] = load_section(jobs)
    doc["latency"] = latency_rows(jobs, plan, doc["matmul_peak_gflops"])
    doc["allocator"] = allocator_section(jobs, plan, read_outputs)
    doc["parity"] = parity_section(plan, read_outputs)
    doc["onnx"] = onnx_section(jobs, doc["latency"])
    doc["scaling"] = scaling_section(jobs, plan, doc.get("scaling_skipped", []))
    doc["throughput"] = throughput_section(jobs, plan.throughput)
    doc["boxes"] = boxes_section(jobs, plan.box_counts)
    doc["stages"] = stages_section(jobs, plan.stage_autocasts)
    doc["serve"] = serve_section(jobs, plan.serve_clients)
    doc["targets"] = targets(doc, plan)
    return doc
