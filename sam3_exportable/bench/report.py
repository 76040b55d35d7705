"""A Markdown summary of a bench ``results.json`` (``summary.md`` beside it).

The tables are the ones docs/performance.md quotes: targets, latency per variant and
shape, export/load costs, scaling fits, parity, FLOP/s, and the top ops of the profiles.
"""

from __future__ import annotations

from typing import Any

from ..contract import OUTPUT_NAMES
from .boxes import boxes_lines
from .host import capability_line
from .online import serve_lines
from .plan import PROFILE_LOAD
from .stages import stages_lines
from .summary import TARGET_COMPARISONS
from .throughput import throughput_lines

__all__ = ["TARGET_COMPARISONS", "format_measured", "markdown_summary", "verdict"]


def _s(stat: dict[str, Any] | None, fmt: str = ".1f") -> str:
    if not stat:
        return "-"
    if stat["n"] == 1:
        return f"{stat['median']:{fmt}}"
    return f"{stat['median']:{fmt}} ({stat['min']:{fmt}}-{stat['max']:{fmt}})"


def _num(value: Any, fmt: str = ".3g") -> str:
    return "-" if value is None else f"{value:{fmt}}"


def _times(value: Any) -> str:
    """A ratio as ``1.234x``; ``-`` when there is none."""
    return "-" if value is None else f"{value:.3f}x"


def format_measured(target: dict[str, Any]) -> str:
    """A target's measured value (a ``doc["targets"]`` entry: ``"target"`` like ``"<= 1.00"``,
    ``"measured"`` a float or None) in the fewest significant digits, 3 or more, whose printed
    value lies on the same side of the bound as the value itself and is not the bound unless
    the value is: 1.004 against ``<= 1.00`` prints as ``1.004``, not as a ``1`` beside "not
    met". ``"not measured"`` for None.

    Raises:
        ValueError: ``target["target"]`` is not ``"<op> <number>"`` with op one of <=, >=, <.
    """
    value = target["measured"]
    if value is None:
        return "not measured"
    op, _, bound_text = str(target["target"]).partition(" ")
    if op not in TARGET_COMPARISONS:
        raise ValueError(
            f"target {target.get('name')!r}: expected '<op> <bound>' with op in "
            f"{sorted(TARGET_COMPARISONS)}, got {target['target']!r}"
        )
    bound, compare = float(bound_text), TARGET_COMPARISONS[op]
    for digits in range(3, 18):
        text = f"{value:.{digits}g}"
        shown = float(text)
        if compare(shown, bound) == compare(value, bound) and (shown != bound or value == bound):
            return text
    return repr(value)


def verdict(target: dict[str, Any]) -> str:
    """``met``, ``NOT met``, ``not applicable here`` or ``not measured``."""
    if not target.get("applicable", True):
        return "not applicable here"
    return {True: "met", False: "NOT met", None: "not measured"}[target["met"]]


def _allocator_lines(alloc: dict[str, Any]) -> list[str]:
    """The malloc-policy paragraph: every job's policy and what it changes for eager (1,1)."""
    if not alloc:
        return []
    applied = alloc.get("applied_in_every_job")
    if alloc.get("policy") == "default":
        status = "malloc's settings left unchanged."
    elif applied:
        status = "applied in every job."
    else:
        status = f"not applied in every job ({'; '.join(alloc.get('reasons', []))})."

    lines = [
        "",
        f"Malloc policy of every job: `{alloc.get('policy')}` (`sam3_exportable.allocator`), {status}",
    ]
    ours, default = alloc.get("with_policy"), alloc.get("with_default")
    if isinstance(ours, dict) and isinstance(default, dict):

        def faults(r: dict[str, Any]) -> str:
            return (
                f"{_num(r.get('minor_faults_per_run'), ',.0f')} page faults, "
                f"{_num(r.get('system_s_per_run'), '.1f')} s kernel time"
            )

        lines[-1] += (
            f" Eager at (1,1): {_s(ours['seconds'], '.2f')} s ({faults(ours)} per run, peak RSS "
            f"{_num(ours.get('peak_rss_gib'), '.2f')} GiB) against {_s(default['seconds'], '.2f')} s "
            f"({faults(default)}, peak RSS {_num(default.get('peak_rss_gib'), '.2f')} GiB) with "
            f"malloc's settings unchanged, {_num(alloc.get('speedup'), '.3f')}x; outputs bitwise "
            f"equal: {alloc.get('outputs_bitwise_equal', 'not compared')}."
        )
    return lines


def _onnx_lines(onnx: dict[str, Any]) -> list[str]:
    """The ONNX section: export stages and sizes, then latency and peak RSS per shape."""
    if not onnx:
        return []
    if "error" in onnx:
        return ["", "## ONNX", "", f"ONNX export failed: {onnx['error']}."]
    stages = ", ".join(f"{stage} {seconds:.1f} s" for stage, seconds in onnx["export"].items())
    sizes = ", ".join(f"{kind} {mib:,.0f} MiB" for kind, mib in onnx["sizes_mib"].items())
    lines = [
        "",
        "## ONNX (onnxruntime, CPU)",
        "",
        f"Export: {stages}; peak RSS {onnx['export_peak_rss_gib']:.2f} GiB; "
        f"sizes (graph + weights): {sizes}.",
        "",
        "| B | P | eager s | .pt2 s | ONNX s | int8 ONNX s | int8 speed-up | peak RSS GiB "
        "(eager / .pt2 / ONNX / int8) | ONNX RSS / .pt2 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    variants = ("eager", "exported", "onnx", "onnx-int8")
    for row in onnx["rows"]:
        secs = " | ".join(f"{row[v]['seconds']:.2f}" if v in row else "-" for v in variants)
        peaks = " / ".join(f"{row[v]['peak_rss_gib']:.2f}" if v in row else "-" for v in variants)
        lines.append(
            f"| {row['B']} | {row['P']} | {secs} | {_num(row.get('int8_speedup_vs_onnx'))} | {peaks} | "
            f"{_num(row.get('onnx_peak_rss_vs_pt2'))} |"
        )
    return lines


def markdown_summary(doc: dict[str, Any]) -> str:
    """Render ``doc`` (a bench results dict after summarising) as Markdown."""
    m, v = doc.get("machine", {}), doc.get("versions", {})
    lines = [
        f"# Bench: {doc.get('size')} model{' (quick)' if doc.get('quick') else ''}",
        "",
        f"`{' '.join(doc.get('command', [])) or 'sam3-exportable bench'}`, {doc.get('created')}; "
        f"{capability_line(m)}, {m.get('memory_gib')} GiB; torch {v.get('torch')}, sam3 {v.get('sam3')}, "
        f"sam3-exportable {v.get('sam3_exportable')}. Figures: median (min-max) of the runs; "
        f"total wall {doc.get('total_wall_s', 0) / 60:.0f} min"
        + "".join(f"; resumed by `{' '.join(c)}`" for c in doc.get("resumed_by", []))
        + ".",
        "",
        "## Targets",
        "",
        "| target | wanted | measured | applies to | met |",
        "|---|---|---|---|---|",
    ]
    for t in doc.get("targets", []):
        met = {"met": "yes", "NOT met": "**no**"}.get(verdict(t), verdict(t))
        measured = format_measured(t) + ("" if t["measured"] is None else f" {t['unit']}")
        lines.append(
            f"| {t['name']} | {t['target']} {t['unit']} | {measured} | "
            f"{t.get('applies_to', 'all hosts')} | {met} |"
        )
    lines += [
        "",
        "## Latency (s)",
        "",
        "| variant | B | P | latency | vs eager | vs own B=1 | peak RSS GiB | GFLOP/s | of matmul peak |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    native = bool(m.get("bf16_native"))
    for r in doc.get("latency", []):
        if "seconds" not in r:
            lines.append(f"| {r['variant']} | {r['B']} | {r['P']} | {r.get('error')} | | | | | |")
            continue
        frac = r.get("fraction_of_matmul_peak")
        of_peak = "-" if frac is None else f"{frac:.0%} ({r.get('matmul_peak_used')})"
        if r["variant"] == "bf16" and not native:
            of_peak += " (bf16 emulated here: not applicable)"
        lines.append(
            f"| {r['variant']} | {r['B']} | {r['P']} | {_s(r['seconds'], '.2f')} | "
            f"{_times(r.get('ratio_to_eager'))} | {_times(r.get('ratio_to_B1'))} | "
            f"{_s(r['peak_rss_gib'], '.2f')} | {_num(r.get('achieved_gflops'), '.0f')} | {of_peak} |"
        )
    for note in doc.get("bf16_reduced", []):
        b, p = note["shape"]
        lines.append(
            f"\nbf16 at ({b},{p}): bf16 matmul is {note['bf16_matmul_slowdown_vs_fp32']:.1f}x slower "
            "than fp32 "
            f"on this CPU, so a forward was predicted at {note['predicted_s_per_forward']:.0f} s; "
            f"with a {note['cap_s']:.0f} s cap it ran once, cold (or not at all if absent above)."
        )
    peaks = doc.get("matmul_peak_gflops", {})
    n = doc.get("plan", {}).get("matmul_n")
    lines += [
        "",
        f"Matmul peak ({n}x{n}x{n}, GFLOP/s): fp32 {_s(peaks.get('fp32'), '.0f')}, "
        f"bf16 {_s(peaks.get('bf16'), '.0f')}. FLOPs per forward are counted by "
        "`torch.utils.flop_counter` on the eager warm-up run.",
    ]
    lines += _allocator_lines(doc.get("allocator", {}))
    lines += [
        "",
        "## Build, save and load",
        "",
        "| step | time s | peak RSS GiB | size MiB |",
        "|---|---|---|---|",
    ]
    for kind, e in doc.get("export", {}).items():
        lines.append(f"| build ({kind}) | {_s(e['build_s'])} | | |")
        lines.append(
            f"| export ({kind}, {e['graph_nodes']} nodes) | {_s(e['export_s'])} | "
            f"{_s(e['peak_rss_gib'], '.2f')} | |"
        )
        lines.append(f"| save ({kind}) | {_s(e['save_s'])} | | {e['size_mib']:,.0f} |")
    aoti = doc.get("aoti", {})
    if "compile_s" in aoti:
        lines.append(
            f"| AOTInductor compile | {_s(aoti['compile_s'])} | {_s(aoti['peak_rss_gib'], '.2f')} | "
            f"{aoti['size_mib']:,.0f} |"
        )
    load = doc.get("load", {})
    for key, label in (
        ("import_torch_s", "import torch"),
        ("import_torchvision_s", "import torchvision"),
    ):
        if key in load:
            lines.append(f"| {label} (fresh process) | {_s(load[key], '.2f')} | | |")
    for key, label in (
        ("read", "read every byte of the .pt2 (file cached)"),
        ("pt2", "load_pipeline (fresh process)"),
        ("pt2_torch", "torch.export.load (fresh process)"),
        ("aoti", "load AOTInductor package (fresh process)"),
    ):
        if key in load:
            lines.append(
                f"| {label} | {_s(load[key]['seconds'], '.2f')} | {_s(load[key]['peak_rss_gib'], '.2f')} | |"
            )
    sc = doc.get("scaling", {})
    lines += [
        "",
        "## Scaling (exported .pt2)",
        "",
        "| B | P | latency s | peak RSS GiB | runs (+warm-up) |",
        "|---|---|---|---|---|",
    ]
    for pt in sc.get("prompts_at_B1", []) + [p for p in sc.get("batches_at_P1", []) if p["B"] > 1]:
        lines.append(
            f"| {pt['B']} | {pt['P']} | {_s(pt['seconds'], '.2f')} | {_s(pt['peak_rss_gib'], '.2f')} | "
            f"{pt['runs']} (+{pt['warmup']}) |"
        )
    lines += [
        "",
        f"Fitted: {_num(sc.get('seconds_per_extra_prompt'))} s and "
        f"{_num(sc.get('gib_per_extra_prompt'))} GiB "
        f"per extra prompt; {_num(sc.get('seconds_per_extra_image'))} s and "
        f"{_num(sc.get('gib_per_extra_image'))} GiB per extra image.",
    ]
    if sc.get("skipped"):
        skipped = ", ".join(
            f"B={s['shape'][0]} P={s['shape'][1]} (~{s['predicted_s']:.0f} s)" for s in sc["skipped"]
        )
        lines.append(f"Skipped for the {sc.get('budget_s')} s budget: {skipped}.")
    lines += [
        "",
        "## Parity at (1,1)",
        "",
        "| comparison | max abs diff (logits / boxes / masks / presence) | "
        "bitwise | kept at 0.5 | kept top-10 per pair (mask pixels differing) |",
        "|---|---|---|---|---|",
    ]
    for key, res in doc.get("parity", {}).items():
        if not isinstance(res, dict):
            continue
        diffs = " / ".join(f"{res['max_abs_diff'][name]:.2g}" for name in OUTPUT_NAMES)
        bitwise = "yes" if all(res["bitwise"].values()) else "no"
        k05, top = res["kept_at_0.5"], next(v for k, v in res.items() if k.startswith("kept_at_top"))
        same05 = "same" if k05["identical"] else "**differ**"
        same_top = "same" if top["identical"] else "**differ**"
        lines.append(
            f"| {key} | {diffs} | {bitwise} | {same05} ({k05['kept']}) | "
            f"{same_top} ({top['kept']} kept, {top['mask_pixels_differing']}) |"
        )
    lines += _onnx_lines(doc.get("onnx", {}))
    lines += throughput_lines(doc.get("throughput"))
    lines += boxes_lines(doc.get("boxes"))
    lines += stages_lines(doc.get("stages"))
    lines += serve_lines(doc.get("serve"))
    for name, prof in doc.get("jobs", {}).items():
        if not name.startswith("profile/") or name == PROFILE_LOAD or not prof.get("top_ops_by_self_cpu"):
            continue
        _, variant, shape = name.split("/")
        lines += [
            "",
            f"## Profile: {variant} at ({shape.replace('x', ',')}), one forward after a warm-up "
            f"({prof['seconds']:.1f} s under the profiler)",
            "",
            "| op | self CPU s | share | calls |",
            "|---|---|---|---|",
        ]
        for op in prof["top_ops_by_self_cpu"][:12]:
            lines.append(f"| `{op['op']}` | {op['self_cpu_s']:.2f} | {op['share']:.1%} | {op['calls']} |")
    return "\n".join(lines) + "\n"
