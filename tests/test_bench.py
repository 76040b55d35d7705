"""The bench tool: its helpers, and the schema (not the numbers) of a quick tiny run."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import TINY_ONNX_BOUNDS as ONNX_BOUNDS

from sam3_exportable import cli
from sam3_exportable.allocator import glibc_version
from sam3_exportable.bench import (
    SCHEMA,
    compare_parity,
    kept_instances,
    linear_fit,
    plan_for,
    run_bench,
    stat,
)
from sam3_exportable.contract import OUTPUT_NAMES
from sam3_exportable.verify import exceeded_bounds

# -- helpers ------------------------------------------------------------------------------


def test_stat_reports_min_median_max() -> None:
    s = stat([3.0, 1.0, 2.0, 10.0])
    assert (s["n"], s["min"], s["median"], s["max"]) == (4, 1.0, 2.5, 10.0)
    with pytest.raises(ValueError, match="at least one"):
        stat([])


def test_linear_fit_recovers_slope_and_needs_two_points() -> None:
    fit = linear_fit([1, 2, 4, 8], [5 + 2 * x for x in (1, 2, 4, 8)])
    assert fit is not None
    assert math.isclose(fit["slope"], 2.0) and math.isclose(fit["intercept"], 5.0)
    assert linear_fit([1, 1], [2, 3]) is None


def _outputs(logit_rows: list[list[float]], presence: list[float]) -> tuple[torch.Tensor, ...]:
    logits = torch.tensor(logit_rows).unsqueeze(-1)
    n, q = logits.shape[:2]
    masks = torch.randn(n, q, 4, 4, generator=torch.Generator().manual_seed(0))
    return logits, torch.zeros(n, q, 4), masks, torch.tensor(presence).unsqueeze(-1)


def test_kept_instances_follow_upstreams_rule() -> None:
    # score = sigmoid(logit) * sigmoid(presence); presence 10 -> ~1
    out = _outputs([[5.0, -5.0, 0.5]], [10.0])
    assert kept_instances(out, 0.5) == [[0, 2]]
    out = _outputs([[5.0, -5.0, 0.5]], [-10.0])  # absent concept: nothing kept
    assert kept_instances(out, 0.5) == [[]]


def test_compare_parity_detects_a_flipped_instance_and_mask_pixels() -> None:
    ref = _outputs([[3.0, 2.0, 1.0, -1.0, -2.0, 0.5]], [10.0])
    same = compare_parity(ref, ref, top_k=2)
    assert all(same["bitwise"].values()) and same["kept_at_top2"]["identical"]
    assert same["kept_at_top2"]["kept"] == 2
    flipped_logits = ref[0].clone()
    flipped_logits[0, 3] = 4.0  # a new instance above both thresholds
    other = (flipped_logits, ref[1], ref[2], ref[3])
    res = compare_parity(ref, other, top_k=2)
    assert not res["bitwise"]["pred_logits"] and res["max_abs_diff"]["pred_logits"] == pytest.approx(5.0)
    assert not res["kept_at_0.5"]["identical"] and not res["kept_at_top2"]["identical"]
    masks = ref[2].clone()
    masks[0, 0] = -masks[0, 0]  # the top instance's mask flips sign everywhere
    res = compare_parity(ref, (ref[0], ref[1], masks, ref[3]), top_k=2)
    assert res["kept_at_top2"]["identical"] and res["kept_at_top2"]["mask_pixels_differing"] == 16


def test_format_measured_never_prints_a_missed_target_as_its_bound() -> None:
    from sam3_exportable.bench.report import format_measured

    def shown(target: str, value: float | None) -> str:
        return format_measured({"name": "t", "target": target, "measured": value})

    assert shown("<= 1.00", 1.0043) == "1.004"  # .3g alone would print "1" beside "not met"
    assert shown("<= 1.00", 0.9996) == "0.9996"
    assert shown("<= 1.00", 1.0) == "1"
    assert shown("<= 1.00", 1.04) == "1.04"
    assert shown(">= 1.1", 1.0996) == "1.0996"
    assert shown("< 360", 274.72) == "275"
    assert shown("< 360", 359.96) == "359.96"
    assert shown("<= 16", 14.716) == "14.7"
    assert shown("<= 1.00", None) == "not measured"
    with pytest.raises(ValueError, match="'about 1'"):
        shown("about 1", 1.0)


def test_plans_and_bad_sizes() -> None:
    quick = plan_for("tiny", quick=True)
    assert "aoti" not in quick.variants and not quick.aoti
    full = plan_for("full")
    assert full.variants == ["eager", "exported", "aoti", "bf16", "onnx", "onnx-int8"]
    assert full.matrix["onnx"] == full.matrix["onnx-int8"] == [(1, 1), (2, 3)] and full.onnx
    assert full.matrix["eager"] == [(1, 1), (2, 3), (1, 8)]
    assert full.matrix["bf16"] == [(1, 1), (2, 1), (4, 1)]  # the per-image cost in B
    assert set(full.matrix["exported"]) == {(1, 1), (2, 1), (4, 1), (2, 3), (1, 8)}
    assert full.matrix["aoti"] == [(1, 1)] and full.warmup >= 1 and full.runs >= 3
    assert 32 in full.scaling_prompts
    assert set(plan_for("full", all_shapes=True).matrix["aoti"]) == set(full.matrix["exported"])
    with pytest.raises(ValueError, match="'tiny' or 'full'"):
        plan_for("huge")
    with pytest.raises(ValueError, match="--quick"):
        plan_for("full", quick=True)
    assert full.malloc == quick.malloc == "retain"
    assert plan_for("tiny", quick=True, malloc="default").malloc == "default"
    with pytest.raises(ValueError, match=r"malloc: expected one of \['retain', 'default'\], got 'jemalloc'"):
        plan_for("tiny", malloc="jemalloc")


def test_narrowed_plans_keep_what_was_asked_and_refuse_the_rest(capsys) -> None:
    from sam3_exportable.bench.plan import narrowed

    full = plan_for("full")
    plan = narrowed(
        full,
        variants=["eager", "bf16", "onnx"],
        shapes=[(1, 1), (2, 3), (4, 1)],
        runs=2,
        skip=["profiles", "allocator"],
    )
    assert plan.matrix == {"eager": [(1, 1), (2, 3)], "bf16": [(1, 1), (4, 1)], "onnx": [(1, 1), (2, 3)]}
    assert plan.runs == 2 and plan.profiles == [] and not plan.allocator_baseline and not plan.aoti
    assert plan.throughput == full.throughput and plan.scaling_prompts == full.scaling_prompts
    assert plan.box_counts == full.box_counts == [1, 4, 16]
    assert narrowed(full, skip=["boxes"]).box_counts == []
    assert (full.stage_autocasts, full.follow_up_phrases) == (["none", "bf16"], 8)
    assert narrowed(full, skip=["stages"]).stage_autocasts == []
    assert narrowed(full, skip=["serve"]).serve_clients == []
    assert narrowed(full, variants=["exported"]).profiles == [("exported", 1, 1), ("exported", 2, 1)]
    with pytest.raises(ValueError, match=r"--variants: expected some of eager, .*got fp64"):
        narrowed(full, variants=["fp64"])
    with pytest.raises(ValueError, match="--shapes: no chosen variant of this plan runs at 3x3"):
        narrowed(full, shapes=[(1, 1), (3, 3)])
    with pytest.raises(ValueError, match=r"--skip: expected some of loads, .*got plots"):
        narrowed(full, skip=["plots"])
    assert cli.main(["bench", "--shapes", "2by3"]) == 2
    assert "expected shapes like 1x1,2x3" in capsys.readouterr().err


# -- a quick tiny run ---------------------------------------------------------------------

_STAT_KEYS = {"n", "min", "median", "max", "values"}


def _is_stat(value: Any) -> bool:
    return (
        isinstance(value, dict)
        and _STAT_KEYS <= set(value)
        and value["n"] == len(value["values"]) >= 1
        and value["min"] <= value["median"] <= value["max"]
    )


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int]:
    out = tmp_path_factory.mktemp("bench") / "bench"
    status = cli.main(["bench", "--size", "tiny", "--quick", "--out", str(out)])
    return out, status


def test_quick_bench_writes_results_and_plots(quick_run: tuple[Path, int]) -> None:
    out, status = quick_run
    assert status == 0
    doc = json.loads((out / "results.json").read_text())
    assert doc["schema"] == SCHEMA and doc["schema_version"] == 6
    assert doc["size"] == "tiny" and doc["quick"] is True
    for key in ("torch", "sam3", "torchvision", "python"):
        assert doc["versions"][key]
    assert doc["machine"]["cpu_count"] >= 1 and doc["machine"]["torch_threads"] >= 1
    assert doc["machine"]["torch_cpu_capability"] and isinstance(doc["machine"]["bf16_native"], bool)
    assert set(doc["machine"]["cpu_flags"]) >= {"avx512_bf16", "amx_bf16", "avx512_vnni"}
    assert not [k for k, v in doc["jobs"].items() if isinstance(v, dict) and "error" in v]

    assert set(doc["matmul_peak_gflops"]) == {"fp32", "bf16"}
    assert all(_is_stat(v) for v in doc["matmul_peak_gflops"].values())
    for kind in ("fp32", "bf16"):
        export = doc["export"][kind]
        for key in ("build_s", "export_s", "save_s", "peak_rss_gib"):
            assert _is_stat(export[key]), key
        assert export["size_mib"] > 0 and "[1, inf]" in export["audit"]
    assert doc["aoti"] == {"skipped": "--quick"}
    for key in ("import_torch_s", "import_torchvision_s"):
        assert _is_stat(doc["load"][key])
    for how in ("read", "pt2", "pt2_torch"):
        assert _is_stat(doc["load"][how]["seconds"]) and _is_stat(doc["load"][how]["peak_rss_gib"])

    rows = {(r["variant"], r["B"], r["P"]): r for r in doc["latency"]}
    shapes = [(1, 1), (2, 1), (1, 8)]
    variants = ("eager", "exported", "bf16", "onnx", "onnx-int8")
    assert set(rows) == {(v, b, p) for v in variants for b, p in shapes}
    for (variant, b, p), row in rows.items():
        assert _is_stat(row["seconds"]) and _is_stat(row["peak_rss_gib"])
        assert row["load_s"] > 0 and row["ratio_to_eager"] > 0
        assert row["flops"] > 0 and row["achieved_gflops"] > 0
        assert row["matmul_peak_used"] == ("bf16" if variant == "bf16" else "fp32")
        assert ("ratio_to_B1" in row) == (b > 1 and (variant, 1, p) in rows)

    parity = doc["parity"]
    assert parity["exported_vs_eager"]["bitwise"] == dict.fromkeys(
        ("pred_logits", "pred_boxes", "pred_masks", "presence_logit_dec"), True
    )
    bf16 = parity["bf16_vs_fp32_eager"]
    assert set(bf16["max_abs_diff"]) == set(bf16["bitwise"])
    assert isinstance(bf16["kept_at_0.5"]["identical"], bool)
    assert exceeded_bounds(parity["onnx_vs_eager"], ONNX_BOUNDS) == {}
    assert set(parity["onnx-int8_vs_onnx"]["max_abs_diff"]) == set(OUTPUT_NAMES)

    onnx = doc["onnx"]
    assert set(onnx["export"]) >= {"build", "export", "onnx", "quantize"} and onnx["export_peak_rss_gib"] > 0
    assert set(onnx["sizes_mib"]) == {"onnx", "onnx-int8"}
    assert [(r["B"], r["P"]) for r in onnx["rows"]] == [(1, 1), (2, 1), (1, 8)]
    for row in onnx["rows"]:
        assert row["int8_speedup_vs_onnx"] > 0 and row["onnx_peak_rss_vs_pt2"] > 0
    assert "## ONNX (onnxruntime, CPU)" in (out / "summary.md").read_text()

    scaling = doc["scaling"]
    assert [pt["P"] for pt in scaling["prompts_at_B1"]] == [1, 2, 8]
    assert [pt["B"] for pt in scaling["batches_at_P1"]] == [1, 2]
    for key in ("seconds_per_extra_prompt", "gib_per_extra_prompt", "seconds_per_extra_image"):
        assert isinstance(scaling[key], float)

    names = [t["name"] for t in doc["targets"]]
    keys = {"target", "measured", "met", "unit", "applies_to", "applicable"}
    assert all(keys <= set(t) for t in doc["targets"])
    assert any("P=32" in n for n in names) and any("load" in n for n in names)
    assert {"exported time(B=2) / time(B=1), P=1", "bf16 time(B=2) / time(B=1), P=1"} <= set(names)
    assert "ONNX peak RSS / .pt2 peak RSS at (2,3)" in names
    compare = {"<=": float.__le__, ">=": float.__ge__, "<": float.__lt__}
    for t in doc["targets"]:
        op, bound = t["target"].split()
        assert t["applicable"] == (t["applies_to"] == "all hosts" or doc["machine"]["bf16_native"])
        measured = t["measured"] is not None and t["applicable"]
        expected = compare[op](float(t["measured"]), float(bound)) if measured else None
        assert t["met"] == expected, t
    assert doc["command"][:4] == ["sam3-exportable", "bench", "--size", "tiny"]

    assert sorted(doc["plots"]) == ["latency_scaling.png", "memory_scaling.png", "variants.png"]
    for name in doc["plots"]:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_quick_bench_measures_batch_throughput(quick_run: tuple[Path, int]) -> None:
    out, _ = quick_run
    doc = json.loads((out / "results.json").read_text())
    rows = doc["throughput"]["rows"]
    threads = doc["plan"]["threads"]
    assert [(r["engine"], r["workers"], r["threads"]) for r in rows] == [
        ("local", 1, threads),
        ("ray", 1, threads),
        ("ray", 2, max(1, threads // 2)),
    ]
    for row in rows:
        assert row["images"] == doc["plan"]["throughput_images"] and row["images_per_hour"] > 0, row
        assert 1 <= row["workers_used"] <= row["workers"] == 1 + (row is rows[2])
        assert len(row["worker_peak_rss_gib"]) == row["workers_used"]
        assert all(0 < v < 64 for v in row["worker_peak_rss_gib"]) and row["driver_peak_rss_gib"] > 0
        assert ("speed_vs_local" in row) == (row["engine"] == "ray")
    assert "## Throughput (segment_images, one image per batch)" in (out / "summary.md").read_text()


def test_quick_bench_times_exemplar_boxes(quick_run: tuple[Path, int]) -> None:
    out, _ = quick_run
    doc = json.loads((out / "results.json").read_text())
    section = doc["boxes"]
    assert [r["boxes"] for r in section["rows"]] == ["text-only", "padding", 1, 4]
    for row in section["rows"]:
        assert _is_stat(row["seconds"]) and row["ratio_to_text_only"] > 0, row
        assert _is_stat(row["geometry_share"]) and 0 < row["geometry_share"]["median"] < 1, row
    assert section["rows"][0]["ratio_to_text_only"] == 1.0
    assert all(f"{dim}=" in section["audit"] for dim in ("batch", "num_prompts", "num_boxes"))
    assert section["audit"].count(":[1, inf]") == 3
    geometry = doc["jobs"]["boxes/geometry"]["by_configuration"]
    assert set(geometry) == {"text-only", "padding", "1", "4"}
    assert all(len(v["share"]) == doc["plan"]["runs"] for v in geometry.values())
    summary = (out / "summary.md").read_text()
    assert "## Exemplar boxes (1 image x 1 phrase)" in summary and "| K = 4 |" in summary


def test_quick_bench_asks_one_image_phrases_in_turn(quick_run: tuple[Path, int]) -> None:
    """The stages section: the staged fp32 .pt2, 3 phrases on one image, cached and not."""
    out, _ = quick_run
    doc = json.loads((out / "results.json").read_text())
    (row,) = doc["stages"]["rows"]
    assert row["autocast"] == "none" and row["phrases"] == 3, row
    assert row["first_s"] > 0 and _is_stat(row["follow_up_s"]) and row["follow_up_speedup"] > 0
    assert row["sequence_uncached_s"] > 0 and row["sequence_speedup"] > 0 and row["peak_rss_gib"] > 0
    job = doc["jobs"]["stages/fp32"]
    assert len(job["cached_s"]) == len(job["uncached_s"]) == 3
    assert job["cache"]["misses"] == 2 and job["cache"]["hits"] == 2  # warm-up image, then the image once
    assert doc["jobs"]["export/fp32-staged"]["size_bytes"] > 0
    summary = (out / "summary.md").read_text()
    assert "## Stages: one image, phrases asked in turn" in summary and "| fp32 |" in summary


def test_quick_bench_loads_the_server_with_concurrent_clients(quick_run: tuple[Path, int]) -> None:
    """The serve section: `serve` under 1 and 4 clients against `predict` on the same images."""
    out, _ = quick_run
    doc = json.loads((out / "results.json").read_text())
    section = doc["serve"]
    assert [r["clients"] for r in section["rows"]] == [1, 4], section
    for row in section["rows"]:
        assert row["requests"] == 4 * row["clients"] and row["errors"] == {}, row
        assert row["requests_per_s"] > 0 and row["vs_predict"] > 0
        assert 0 < row["p50_ms"] <= row["p95_ms"] <= row["p99_ms"]
    assert section["rows"][0]["mean_batch_size"] == 1.0  # one client: never company
    assert section["predict_images_per_s"] > 0 and section["replica_peak_rss_gib"] > 0
    assert section["stop_s"] is not None and section["ready_s"] > 0
    assert section["replica_malloc"]["policy"] == "retain"  # the replica's own process took it
    assert section["replica_malloc"]["applied"] is True
    summary = (out / "summary.md").read_text()
    assert "## Serve: concurrent clients over loopback" in summary and "| 4 | 16 |" in summary


def test_bf16_targets_are_not_applicable_where_bf16_is_emulated(quick_run: tuple[Path, int]) -> None:
    from sam3_exportable.bench.report import markdown_summary, verdict
    from sam3_exportable.bench.summary import targets

    out, _ = quick_run
    doc = json.loads((out / "results.json").read_text())
    for native in (True, False):
        doc["machine"]["bf16_native"] = native
        rows = {t["name"]: t for t in targets(doc, plan_for("tiny", quick=True))}
        bf16 = [t for name, t in rows.items() if name.startswith("bf16")]
        assert bf16 and all(t["applies_to"].startswith("hosts with native bf16") for t in bf16)
        for t in bf16:
            assert t["applicable"] is native
            assert (verdict(t) == "not applicable here") is (not native)
            assert (t["met"] is None) if not native else (t["met"] is not None or t["measured"] is None)
        fp32 = rows["exported time(B=2) / time(B=1), P=1"]
        assert fp32["applicable"] and fp32["met"] is not None
    doc["targets"] = list(rows.values())
    assert "| not applicable here |" in markdown_summary(doc)


def test_quick_bench_records_the_malloc_policy(quick_run: tuple[Path, int]) -> None:
    out, _ = quick_run
    doc = json.loads((out / "results.json").read_text())
    # every worker job ran under the plan's malloc policy, except the allocator baseline
    assert doc["plan"]["malloc"] == "retain" and "malloc_env" in doc["machine"]
    worker_jobs = {k: v for k, v in doc["jobs"].items() if isinstance(v, dict) and k != "imports"}
    if glibc_version() is None:  # retain is not applied anywhere, and no baseline runs
        assert doc["allocator"]["applied_in_every_job"] is False
        assert "allocator/eager-default/1x1" not in worker_jobs
        return
    for key, job in worker_jobs.items():
        assert job["malloc"]["applied"] is (key != "allocator/eager-default/1x1"), key
    alloc = doc["allocator"]
    assert alloc["policy"] == "retain" and alloc["applied_in_every_job"] is True and alloc["speedup"] > 0
    for which, applied in (("with_policy", True), ("with_default", False)):
        assert alloc[which]["applied"] is applied and _is_stat(alloc[which]["seconds"])
        assert alloc[which]["minor_faults_per_run"] >= 0 and alloc[which]["system_s_per_run"] >= 0
    assert alloc["outputs_bitwise_equal"] is True
    for row in doc["latency"]:
        assert row["minor_faults_per_run"] >= 0, row
    summary = (out / "summary.md").read_text()
    assert (
        "Malloc policy of every job: `retain` (`sam3_exportable.allocator`), applied in every job." in summary
    )
    assert "with malloc's settings unchanged" in summary and "outputs bitwise equal: True" in summary


def test_quick_bench_refuses_to_overwrite_and_resumes(quick_run: tuple[Path, int]) -> None:
    out, _ = quick_run
    before = json.loads((out / "results.json").read_text())
    with pytest.raises(FileExistsError, match="--resume"):
        run_bench(plan_for("tiny", quick=True), out, plots=False)
    logs: list[str] = []
    doc = run_bench(plan_for("tiny", quick=True), out, resume=True, plots=False, log=logs.append)
    assert not [line for line in logs if line.endswith("...")], "a finished job ran again"
    assert doc["jobs"] == before["jobs"]
    with pytest.raises(ValueError, match="different plan"):
        run_bench(plan_for("tiny", quick=False), out, resume=True, plots=False)
    with pytest.raises(ValueError, match=r"different plan \(differs in malloc\)"):
        run_bench(plan_for("tiny", quick=True, malloc="default"), out, resume=True, plots=False)


def test_resume_keeps_the_bf16_decision_of_the_first_run(tmp_path: Path) -> None:
    from sam3_exportable.bench import BenchRun
    from sam3_exportable.bench.report import markdown_summary

    plan = plan_for("tiny", quick=True)
    note = {
        "shape": [1, 1],
        "predicted_s_per_forward": 300.0,
        "cap_s": 900.0,
        "bf16_matmul_slowdown_vs_fp32": 8.5,
    }
    first = BenchRun(plan, tmp_path, tmp_path / "work", command=["sam3-exportable", "bench"])
    first.doc.update(bf16_reduced=[note], total_wall_s=3600.0, started="2026-01-01T00:00:00+00:00")
    first.save()
    again = ["sam3-exportable", "bench", "--resume"]
    resumed = BenchRun(plan, tmp_path, tmp_path / "work", resume=True, command=again)
    # without it, a resumed run would profile a bf16 forward the first run had ruled out
    assert resumed.doc["bf16_reduced"] == [note]
    # the first run's command, start and time stay; the resume is recorded after them
    assert resumed.doc["command"] == ["sam3-exportable", "bench"] and resumed.doc["resumed_by"] == [again]
    assert resumed.doc["total_wall_s"] == 3600.0 and resumed.doc["started"].startswith("2026-01-01")
    assert "resumed by `sam3-exportable bench --resume`" in markdown_summary(resumed.doc)
    assert "bf16_reduced" not in BenchRun(plan, tmp_path / "new", tmp_path / "work").doc
