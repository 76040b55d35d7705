"""Running a bench plan: every job in its own fresh process, ``results.json`` kept current.

Every configuration runs in its own fresh process (:mod:`.worker`), one after the other in
a single invocation, so ratios between configurations hold on a noisy machine. Latencies
are medians of ``runs`` timed forwards after ``warmup`` untimed ones; every figure is stored
with its min, median and max. Results go to ``<out>/results.json`` (written atomically after
every job, so an interrupted run keeps what it measured and ``--resume`` continues it),
``summary.md`` and PNG plots beside it. The summary sections are computed by
:mod:`.summary`, the Markdown by :mod:`.report`, the plots by :mod:`.plots`.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from ..artifact.files import atomic_write
from ..artifact.manifest import versions_record
from ..errors import OutputExistsError
from .host import machine_info
from .online import SERVE_LOAD
from .plan import (
    ALLOCATOR_BASELINE,
    AOTI_COMPILE,
    BOX_ARTIFACT,
    BOX_EXPORT,
    GEOMETRY_SHARE,
    IMPORTS,
    MATMUL_PEAK,
    ONNX_EXPORT,
    PROFILE_LOAD,
    VARIANTS,
    BenchPlan,
    artifact_name,
    box_latency_key,
    export_key,
    follow_up_key,
    latency_key,
    load_key,
    outputs_name,
    profile_key,
    scaling_key,
    staged_artifact_name,
    staged_export_key,
    throughput_key,
)
from .summary import summarize

__all__ = ["SCHEMA", "SCHEMA_VERSION", "BenchRun", "run_bench"]

SCHEMA = "sam3-exportable/bench"
#: 6: plan.serve_clients and the serve section;
#: 5: plan.stage_autocasts and the stages section; 4: plan.box_counts and the boxes section;
#: 3: plan.matrix and plan.profiles, targets with
#: applies_to, machine.cpu_flags as a dict
SCHEMA_VERSION = 6


class BenchRun:
    """Runs the jobs of a :class:`~.plan.BenchPlan` and keeps ``results.json`` current."""

    def __init__(
        self,
        plan: BenchPlan,
        out_dir: Path,
        work_dir: Path,
        *,
        resume: bool = False,
        log: Callable[[str], None] = print,
        command: Sequence[str] = (),
    ) -> None:
        self.plan, self.out_dir, self.work_dir, self.log = plan, out_dir, work_dir, log
        self.results_path = out_dir / "results.json"
        previous: dict[str, Any] = {}
        if resume and self.results_path.is_file():
            previous = json.loads(self.results_path.read_text())
            wanted = _jsonable(dataclasses.asdict(plan))
            if previous.get("plan") != wanted:
                old = previous.get("plan") or {}
                differ = sorted(k for k in set(old) | set(wanted) if old.get(k) != wanted.get(k))
                raise ValueError(
                    f"--resume: {self.results_path} was written by a different plan "
                    f"(differs in {', '.join(differ)}); "
                    "rerun without --resume (and with --force) to start over"
                )
        self.jobs: dict[str, Any] = previous.get("jobs", {})
        self.doc: dict[str, Any] = {
            "schema": SCHEMA,
            "schema_version": SCHEMA_VERSION,
            "created": previous.get("created")
            or datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": list(command),
            "size": plan.size,
            "quick": plan.quick,
            "machine": machine_info(),
            "versions": versions_record("onnx", "onnxruntime", "ray"),
            "plan": _jsonable(dataclasses.asdict(plan)),
            "jobs": self.jobs,
        }
        if previous:
            # what the first run decided and spent stays; each resume is recorded after it
            for key in ("command", "started", "total_wall_s", "bf16_reduced"):
                if key in previous:
                    self.doc[key] = previous[key]
            self.doc["resumed_by"] = [*previous.get("resumed_by", []), list(command)]

    # -- jobs ---------------------------------------------------------------------------
    def job(self, key: str, spec: dict[str, Any], timeout_s: float | None = None) -> dict[str, Any]:
        """Run one worker job in a fresh process, once: a finished key is reused. A job still
        running after ``timeout_s`` is killed and recorded as an error."""
        if key in self.jobs and "error" not in self.jobs[key]:
            self.log(f"[{key}] reused from {self.results_path}")
            return self.jobs[key]
        spec = {
            "threads": self.plan.threads,
            "seed": self.plan.seed,
            "size": self.plan.size,
            "malloc": self.plan.malloc,
            **spec,
        }
        self.log(f"[{key}] ...")
        with tempfile.TemporaryDirectory(dir=self.work_dir) as tmp:
            spec_file, result_file = Path(tmp) / "spec.json", Path(tmp) / "result.json"
            spec_file.write_text(json.dumps(spec))
            start = time.perf_counter()
            try:
                proc = subprocess.run(
                    [sys.executable, "-m", "sam3_exportable.bench.worker", str(spec_file), str(result_file)],
                    capture_output=True,
                    text=True,
                    check=False,
                    timeout=timeout_s,
                )
            except subprocess.TimeoutExpired:
                proc = subprocess.CompletedProcess(
                    [], returncode=-9, stdout="", stderr=f"timed out after {timeout_s} s"
                )
            wall = time.perf_counter() - start
            if proc.returncode != 0 or not result_file.is_file():
                tail = (proc.stderr or proc.stdout or "").strip().splitlines()[-15:]
                result: dict[str, Any] = {"error": f"exit status {proc.returncode}", "stderr_tail": tail}
            else:
                result = json.loads(result_file.read_text())
        result["process_wall_s"] = wall
        self.jobs[key] = result
        self.save()
        if "error" in result:
            self.log(f"[{key}] FAILED ({result['error']}):\n  " + "\n  ".join(result["stderr_tail"]))
        else:
            self.log(f"[{key}] done in {wall:.1f} s")
        return result

    def save(self) -> None:
        with atomic_write(self.results_path, force=True) as tmp:
            tmp.write_text(json.dumps(self.doc, indent=2, sort_keys=True, default=_json_default) + "\n")

    def artifact(self, name: str) -> Path:
        return self.work_dir / name

    def read_outputs(self, name: str) -> Sequence[torch.Tensor] | None:
        path = self.artifact(name)
        return torch.load(path) if path.is_file() else None

    def run(self) -> dict[str, Any]:
        plan = self.plan
        self.doc.setdefault(
            "started", datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        )
        start = time.perf_counter()
        self.job(
            MATMUL_PEAK,
            {
                "job": "matmul_peak",
                "n": plan.matmul_n,
                "runs": plan.matmul_runs,
                "dtypes": ["float32", "bfloat16"],
            },
        )
        self._import_torch()
        autocasts = {spec["autocast"] for v, spec in VARIANTS.items() if spec and v in plan.matrix} - {"none"}
        for autocast in ["none", *sorted(autocasts)]:
            variant = "exported" if autocast == "none" else autocast
            self.job(
                export_key(autocast),
                {"job": "export", "autocast": autocast, "out": str(self.artifact(artifact_name(variant)))},
            )
        fp32 = self.artifact(artifact_name("exported"))
        if plan.aoti:
            self.job(
                AOTI_COMPILE,
                {
                    "job": "aoti_compile",
                    "pt2": str(fp32),
                    "out": str(self.artifact(artifact_name("aoti"))),
                    "inductor_configs": plan.inductor_configs,
                },
            )
        if plan.onnx:
            self.job(
                ONNX_EXPORT,
                {
                    "job": "export",
                    "formats": ["onnx"],
                    "quantize": "int8" if "onnx-int8" in plan.matrix else None,
                    "out": str(self.artifact(artifact_name("onnx"))),
                },
            )
        loads = [("read", fp32), ("pt2", fp32), ("pt2-torch", fp32)]
        if plan.aoti:
            loads.append(("aoti", self.artifact(artifact_name("aoti"))))
        for how, path in loads:
            for i in range(plan.load_runs):
                self.job(load_key(how, i), {"job": "load", "how": how, "path": str(path)})
        self._latency_matrix()
        self._allocator_baseline()
        self._scaling(fp32)
        self._profiles()
        self._throughput(fp32)
        self._boxes(fp32)
        self._stages()
        self._serve(fp32)
        self.doc["total_wall_s"] = self.doc.get("total_wall_s", 0.0) + time.perf_counter() - start
        summarize(self.doc, plan, self.read_outputs)
        self.save()
        return self.doc

    def _latency_matrix(self) -> None:
        plan = self.plan
        for b, p in plan.shapes:
            flops_counted = any("flops" in self.jobs.get(latency_key(v, b, p), {}) for v in plan.matrix)
            for variant, shapes in plan.matrix.items():
                if (b, p) not in shapes:
                    continue
                key = latency_key(variant, b, p)
                warmup, runs = plan.warmup, plan.runs
                if variant == "bf16" and key not in self.jobs:
                    warmup, runs = self._bf16_runs(b, p)
                    if runs == 0:
                        continue
                # FLOPs are counted on eager's warm-up only: FlopCounterMode's module tracker
                # cannot hook a loaded program's parameters under inference mode
                count = variant == "eager" and not flops_counted and warmup > 0
                flops_counted = flops_counted or count
                spec = {
                    "job": "latency",
                    "variant": variant,
                    "path": None if variant == "eager" else str(self.artifact(artifact_name(variant))),
                    "shape": [b, p],
                    "warmup": warmup,
                    "runs": runs,
                    "count_flops": count,
                    "save_outputs": str(self.artifact(outputs_name(variant, b, p)))
                    if (b, p) == (1, 1)
                    else None,
                }
                reduced = variant == "bf16" and (warmup, runs) != (plan.warmup, plan.runs)
                self.job(key, spec, timeout_s=plan.bf16_cap_s + 180 if reduced else None)

    def _allocator_baseline(self) -> None:
        """The same eager forward with malloc's settings unchanged: what the policy changes."""
        plan = self.plan
        if plan.malloc == "default" or "eager" not in plan.matrix or not plan.allocator_baseline:
            return
        if not self.jobs.get(MATMUL_PEAK, {}).get("malloc", {}).get("applied"):
            self.log(f"[allocator] policy {plan.malloc!r} was not applied in the jobs: no baseline run")
            return
        self.job(
            ALLOCATOR_BASELINE,
            {
                "job": "latency",
                "variant": "eager",
                "path": None,
                "shape": [1, 1],
                "warmup": plan.warmup,
                "runs": plan.runs,
                "malloc": "default",
                "save_outputs": str(self.artifact(outputs_name("eager", 1, 1, "-default-malloc"))),
            },
        )

    def _bf16_runs(self, b: int, p: int) -> tuple[int, int]:
        """(warm-up, timed runs) for bf16 at (b, p): the plan's, unless bf16 matmul is slower
        than fp32 here (no bf16 instructions) and that many forwards would exceed
        ``bf16_cap_s``; then one cold run, or none (recorded in ``bf16_reduced``)."""
        plan = self.plan
        peaks = self.jobs.get(MATMUL_PEAK, {})
        reference = (
            self.jobs.get(latency_key("eager", b, p)) or self.jobs.get(latency_key("exported", b, p)) or {}
        )
        try:
            slowdown = statistics.median(peaks["float32"]["gflops"]) / statistics.median(
                peaks["bfloat16"]["gflops"]
            )
        except (KeyError, ZeroDivisionError, statistics.StatisticsError):
            return plan.warmup, plan.runs
        if slowdown <= 1.0 or not reference.get("seconds"):
            return plan.warmup, plan.runs
        predicted = statistics.median(reference["seconds"]) * slowdown
        note = {
            "shape": [b, p],
            "bf16_matmul_slowdown_vs_fp32": slowdown,
            "predicted_s_per_forward": predicted,
            "cap_s": plan.bf16_cap_s,
        }
        if predicted * (plan.warmup + plan.runs) <= plan.bf16_cap_s:
            return plan.warmup, plan.runs
        self.doc.setdefault("bf16_reduced", []).append(note)
        if predicted <= plan.bf16_cap_s:
            self.log(
                f"[{latency_key('bf16', b, p)}] one cold run only: predicted {predicted:.0f} s per forward"
            )
            return 0, 1
        self.log(f"[{latency_key('bf16', b, p)}] skipped: predicted {predicted:.0f} s per forward")
        return 0, 0

    def _import_torch(self) -> None:
        """Import times of torch, then torchvision, each in a bare fresh interpreter."""
        if IMPORTS in self.jobs:
            return
        code = (
            "import time; t0 = time.perf_counter(); import torch; t1 = time.perf_counter(); "
            "import torchvision; print(t1 - t0, time.perf_counter() - t1)"
        )
        runs = []
        for _ in range(max(1, self.plan.load_runs)):
            proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
            torch_s, tv_s = (float(v) for v in proc.stdout.split()[-2:])
            runs.append({"torch_s": torch_s, "torchvision_s": tv_s})
        self.jobs[IMPORTS] = runs
        self.save()

    def _scaling(self, fp32: Path) -> None:
        """Exported ``.pt2`` at (1, P) and (B, 1); points already measured by the latency
        matrix are reused, the rest run while the budget lasts."""
        plan = self.plan
        matrix = set(plan.matrix.get("exported", []))
        prompts = [(1, p) for p in plan.scaling_prompts]
        batches = [(b, 1) for b in plan.scaling_batches]
        # Most important first: the first P point (P=32 at full size), the first B point,
        # then the rest in the order given.
        points = prompts[:1] + batches[:1] + prompts[1:] + batches[1:]
        budget = float("inf") if plan.scaling_budget_s is None else plan.scaling_budget_s
        skipped = []
        for b, p in points:
            if (b, p) in matrix:
                continue
            key = scaling_key(b, p)
            if key not in self.jobs:
                predicted = self._predict_seconds(b, p) * (plan.scaling_warmup + plan.scaling_runs) + 30
                if predicted > budget:
                    skipped.append(
                        {"shape": [b, p], "predicted_s": round(predicted, 1), "budget_left_s": budget}
                    )
                    self.log(f"[{key}] skipped: predicted {predicted:.0f} s > budget left {budget:.0f} s")
                    continue
            spec = {
                "job": "latency",
                "variant": "exported",
                "path": str(fp32),
                "shape": [b, p],
                "warmup": plan.scaling_warmup,
                "runs": plan.scaling_runs,
            }
            result = self.job(key, spec)
            budget -= result.get("process_wall_s", 0.0)
        self.doc["scaling_skipped"] = skipped

    def _predict_seconds(self, b: int, p: int) -> float:
        """Linear model from the exported (1,1) and (1,8) latencies (a rough budget guide)."""

        def median(key: str) -> float | None:
            res = self.jobs.get(key, {})
            return statistics.median(res["seconds"]) if res.get("seconds") else None

        t11 = median(latency_key("exported", 1, 1)) or 1.0
        t18 = median(latency_key("exported", 1, 8))
        per_prompt = (t18 - t11) / 7 if t18 else t11 * 0.2
        return b * (t11 + per_prompt * (p - 1))

    def _profiles(self) -> None:
        """Op-level profiles of the plan's (variant, shape) pairs, and a cProfile of the load."""
        if not self.plan.profiles:
            return
        self.job(PROFILE_LOAD, {"job": "profile_load", "path": str(self.artifact(artifact_name("exported")))})
        reduced = bool(self.doc.get("bf16_reduced"))
        for variant, b, p in self.plan.profiles:
            if variant == "bf16" and reduced:
                continue  # its matmul peak already says why; one more slow forward adds nothing
            if variant in self.plan.matrix:
                spec = {"job": "profile", "path": str(self.artifact(artifact_name(variant))), "shape": [b, p]}
                self.job(profile_key(variant, b, p), spec)

    def _throughput(self, fp32: Path) -> None:
        """``segment_images`` over the same images per engine configuration (:mod:`.throughput`)."""
        plan = self.plan
        for engine, workers, threads in plan.throughput if plan.throughput_images else []:
            spec = {
                "job": "throughput",
                "path": str(fp32),
                "engine": engine,
                "workers": workers,
                "threads": threads,
                "images": plan.throughput_images,
                "image_size": list(plan.throughput_image_size),
                "phrases": plan.throughput_phrases,
                "work": str(self.work_dir),
            }
            self.job(throughput_key(engine, workers, threads), spec)

    def _boxes(self, fp32: Path) -> None:
        """The box-capable ``.pt2`` against the text-only one at (1,1) (:mod:`.boxes`)."""
        plan = self.plan
        if not plan.box_counts:
            return
        boxed = self.artifact(BOX_ARTIFACT)
        export = self.job(BOX_EXPORT, {"job": "export", "boxes": True, "out": str(boxed)})
        common = {"job": "latency", "shape": [1, 1], "warmup": plan.warmup, "runs": plan.runs}
        self.job(box_latency_key("text-only"), {**common, "variant": "exported", "path": str(fp32)})
        if "error" not in export:
            self.job(box_latency_key("padding"), {**common, "variant": "exported", "path": str(boxed)})
            for count in plan.box_counts:
                spec = {**common, "variant": "exported", "path": str(boxed), "boxes": count}
                self.job(box_latency_key(count), spec)
        spec = {"job": "geometry_share", "counts": plan.box_counts, "runs": plan.runs}
        self.job(GEOMETRY_SHARE, spec)

    def _stages(self) -> None:
        """Staged ``.pt2`` artifacts asked one image's phrases in turn (:mod:`.stages`)."""
        for autocast in self.plan.stage_autocasts:
            staged = self.artifact(staged_artifact_name(autocast))
            spec = {"job": "export", "staged": True, "autocast": autocast, "out": str(staged)}
            export = self.job(staged_export_key(autocast), spec)
            if "error" not in export:
                spec = {"job": "follow_up", "path": str(staged), "phrases": self.plan.follow_up_phrases}
                self.job(follow_up_key(autocast), spec)

    def _serve(self, fp32: Path) -> None:
        """The fp32 ``.pt2`` behind ``sam3-exportable serve`` under concurrent clients (:mod:`.online`)."""
        plan = self.plan
        if not plan.serve_clients:
            return
        spec = {
            "job": "serve",
            "path": str(fp32),
            "images": max(plan.throughput_images, 4),
            "image_size": list(plan.throughput_image_size),
            "phrases": plan.throughput_phrases,
            "clients": plan.serve_clients,
            "requests_per_client": plan.serve_requests_per_client,
            "work": str(self.work_dir),
        }
        self.job(SERVE_LOAD, spec)


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=_json_default))


def _json_default(value: Any) -> Any:
    if isinstance(value, tuple):
        return list(value)
    raise TypeError(f"not JSON-serialisable: {type(value).__name__}")


def run_bench(
    plan: BenchPlan,
    out_dir: str | os.PathLike[str],
    *,
    work_dir: str | os.PathLike[str] | None = None,
    resume: bool = False,
    force: bool = False,
    plots: bool = True,
    log: Callable[[str], None] = print,
    command: Sequence[str] = (),
) -> dict[str, Any]:
    """Run ``plan``; write ``out_dir/results.json``, ``summary.md`` and the plots; return the results.

    ``work_dir`` holds the artifacts the bench builds (default ``out_dir/work``; the full
    size needs about 10 GB there). An existing ``results.json`` is refused unless
    ``force`` (start over) or ``resume`` (continue: finished jobs are reused).
    """
    out = Path(out_dir)
    results = out / "results.json"
    if results.exists() and not (force or resume):
        raise OutputExistsError(f"{results}: exists; pass --resume to continue it or --force to start over")
    out.mkdir(parents=True, exist_ok=True)
    work = Path(work_dir) if work_dir else out / "work"
    work.mkdir(parents=True, exist_ok=True)
    runner = BenchRun(plan, out, work, resume=resume and results.exists(), log=log, command=command)
    doc = runner.run()
    from .report import markdown_summary

    with atomic_write(out / "summary.md", force=True) as tmp:
        tmp.write_text(markdown_summary(doc))
    if plots:
        from .plots import write_plots

        doc["plots"] = write_plots(doc, out)
        runner.save()
    return doc
