"""``sam3-exportable bench``: what the artifact costs, side by side with eager, in one run.

Every configuration runs in its own fresh process (:mod:`.bench_worker`), one after the
other in a single invocation, so ratios between configurations hold on a noisy machine.
Latencies are medians of ``runs`` timed forwards after ``warmup`` untimed ones; every
figure is stored with its min, median and max. Results go to ``<out>/results.json``
(written atomically after every job, so an interrupted run keeps what it measured and
``--resume`` continues it) and PNG plots beside it.

Figures: export and save time, peak RSS and artifact size; fresh-process load time next to
the time to read the same file; latency of eager, exported ``.pt2``, AOTInductor package
and bf16-autocast ``.pt2`` per shape; latency and peak RSS versus P and B with a linear fit
(cost per extra prompt and per extra image); FLOPs per forward and achieved FLOP/s
against this machine's measured matmul peaks; output parity; and the speed targets.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from .artifact import atomic_write, versions_record
from .bench_report import TARGET_COMPARISONS

__all__ = [
    "SCHEMA",
    "BenchPlan",
    "kept_instances",
    "linear_fit",
    "plan_for",
    "run_bench",
    "stat",
]

SCHEMA = "sam3-exportable/bench"
SCHEMA_VERSION = 2  # 2: plan.malloc, the allocator section, faults per latency row
GIB = float(1 << 30)
VARIANTS = ("eager", "exported", "aoti", "bf16")


@dataclasses.dataclass
class BenchPlan:
    """What one bench invocation measures (see :func:`plan_for` for the presets)."""

    size: str
    quick: bool
    shapes: list[tuple[int, int]]
    variants: list[str]
    #: Shapes for the ``aoti`` and ``bf16`` variants (eager and exported run all ``shapes``).
    other_shapes: list[tuple[int, int]]
    warmup: int
    runs: int
    scaling_prompts: list[int]
    scaling_batches: list[int]
    scaling_warmup: int
    scaling_runs: int
    scaling_budget_s: float | None  # None: no limit
    load_runs: int
    matmul_n: int
    matmul_runs: int
    aoti: bool
    inductor_configs: dict[str, Any]
    profile: bool
    threads: int
    #: Most seconds the bf16 variant may take per configuration; when its forward is
    #: predicted slower (bf16 matmul slower than fp32 on this CPU), it runs once, cold, or
    #: not at all if even one run would exceed this.
    bf16_cap_s: float = 900.0
    seed: int = 0
    #: malloc policy of every job's process (:func:`sam3_exportable.allocator.apply_malloc_policy`);
    #: eager at (1,1) also runs once more under ``"default"`` to measure what it changes.
    malloc: str = "retain"


def plan_for(
    size: str,
    quick: bool = False,
    *,
    scaling_budget_s: float | None = None,
    all_shapes: bool = False,
    malloc: str = "retain",
) -> BenchPlan:
    """The preset plan for ``size`` (``tiny`` or ``full``).

    ``tiny``: every shape, variant and scaling point with one warm-up and three timed runs.
    ``tiny --quick``: no AOTInductor compile (it alone takes minutes), one timed run, a
    shorter scaling series: a couple of minutes, for checking the tool itself.
    ``full``: eager and exported ``.pt2`` at (1,1), (2,3), (1,8), AOTInductor and bf16 at
    (1,1) (with ``all_shapes``: at all three, about 40 more minutes on 2 cores), one warm-up
    and three timed runs each; scaling points beyond those are single cold runs of the
    exported ``.pt2``, taken in order of importance (P=32 first: it carries the memory
    target, then B=2 for the per-image cost) while their predicted cost fits
    ``scaling_budget_s`` (default 600 s).

    ``malloc`` is the malloc policy of every job (``retain`` or ``default``, see
    :mod:`sam3_exportable.allocator`): all variants run under the same one, so ratios compare
    programs, not allocators.
    """
    from .allocator import MALLOC_POLICIES
    from .aoti import DEFAULT_INDUCTOR_CONFIGS

    if malloc not in MALLOC_POLICIES:
        raise ValueError(f"bench malloc: expected one of {list(MALLOC_POLICIES)}, got {malloc!r}")

    if size not in ("tiny", "full"):
        raise ValueError(f"bench size: expected 'tiny' or 'full', got {size!r}")
    if size == "full" and quick:
        raise ValueError("bench --quick: expected --size tiny (a quick full-size run is not meaningful)")
    threads = torch.get_num_threads()
    shapes = [(1, 1), (2, 3), (1, 8)]
    common: dict[str, Any] = {
        "size": size,
        "quick": quick,
        "shapes": shapes,
        "other_shapes": shapes if (size == "tiny" or all_shapes) else [(1, 1)],
        "variants": [v for v in VARIANTS if not (quick and v == "aoti")],
        "aoti": not quick,
        "inductor_configs": dict(DEFAULT_INDUCTOR_CONFIGS),
        "threads": threads,
        "malloc": malloc,
    }
    if size == "tiny":
        return BenchPlan(
            **common,
            warmup=1,
            runs=1 if quick else 3,
            scaling_prompts=[1, 2, 4, 8] if quick else [1, 2, 4, 8, 16, 32],
            scaling_batches=[1, 2] if quick else [1, 2, 4],
            scaling_warmup=1,
            scaling_runs=1 if quick else 3,
            scaling_budget_s=scaling_budget_s,
            load_runs=1 if quick else 3,
            matmul_n=1024 if quick else 2048,
            matmul_runs=3,
            profile=not quick,
        )
    return BenchPlan(
        **common,
        warmup=1,
        runs=3,
        scaling_prompts=[32, 4, 2, 16],
        scaling_batches=[2, 4],
        scaling_warmup=0,
        scaling_runs=1,
        scaling_budget_s=600.0 if scaling_budget_s is None else scaling_budget_s,
        load_runs=3,
        matmul_n=2048,
        matmul_runs=3,
        profile=True,
    )


def stat(values: Sequence[float]) -> dict[str, Any]:
    """``{"n", "min", "median", "max", "values"}`` of a non-empty sequence."""
    vals = [float(v) for v in values]
    if not vals:
        raise ValueError("stat: expected at least one value, got none")
    return {
        "n": len(vals),
        "min": min(vals),
        "median": statistics.median(vals),
        "max": max(vals),
        "values": vals,
    }


def linear_fit(xs: Sequence[float], ys: Sequence[float]) -> dict[str, float] | None:
    """Least-squares ``y = intercept + slope * x``; None with fewer than two distinct x."""
    if len(set(xs)) < 2:
        return None
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx
    return {"slope": slope, "intercept": my - slope * mx}


def pair_scores(logits: torch.Tensor, presence: torch.Tensor) -> torch.Tensor:
    """Upstream's instance scores ``sigmoid(logits) * sigmoid(presence)``: ``[N, Q]``."""
    return (logits.float().sigmoid() * presence.float().sigmoid().unsqueeze(1)).squeeze(-1)


def kept_instances(outputs: Sequence[torch.Tensor], threshold: float | Sequence[float]) -> list[list[int]]:
    """Per pair, the query indices whose score exceeds the threshold (upstream's keep rule);
    ``threshold`` is one value for all pairs or one per pair."""
    scores = pair_scores(outputs[0], outputs[3])
    per_pair = [float(threshold)] * len(scores) if isinstance(threshold, (int, float)) else list(threshold)
    return [torch.nonzero(row > t).flatten().tolist() for row, t in zip(scores, per_pair, strict=True)]


def compare_parity(
    reference: Sequence[torch.Tensor], other: Sequence[torch.Tensor], top_k: int = 10
) -> dict[str, Any]:
    """Max |diff| per output, bitwise equality, and whether post-processing keeps the same
    instances with the same binary masks, at threshold 0.5 and at the threshold midway
    between the reference's ``top_k``-th and next score per pair (so the reference keeps
    exactly ``top_k`` there even with random weights)."""
    from .pipeline import OUTPUT_NAMES

    out: dict[str, Any] = {"max_abs_diff": {}, "bitwise": {}}
    for name, a, b in zip(OUTPUT_NAMES, reference, other, strict=True):
        a, b = a.float(), b.float()
        out["max_abs_diff"][name] = float((a.double() - b.double()).abs().max()) if a.numel() else 0.0
        out["bitwise"][name] = bool(torch.equal(a, b))
    top = pair_scores(reference[0], reference[3]).sort(dim=1, descending=True).values
    k = min(top_k, top.shape[1] - 1)
    checks = {"0.5": 0.5, f"top{k}": ((top[:, k - 1] + top[:, k]) / 2).tolist()}
    for label, thresholds in checks.items():
        ref_kept, got_kept = kept_instances(reference, thresholds), kept_instances(other, thresholds)
        same, pixels, kept = True, 0, 0
        for i, (ref_keep, got_keep) in enumerate(zip(ref_kept, got_kept, strict=True)):
            if ref_keep != got_keep:
                same = False
                continue
            kept += len(ref_keep)
            pixels += int(((reference[2][i, ref_keep] > 0) != (other[2][i, ref_keep] > 0)).sum())
        out[f"kept_at_{label}"] = {"identical": same, "kept": kept, "mask_pixels_differing": pixels}
    return out


def machine_info() -> dict[str, Any]:
    """CPU model, cores, memory, instruction-set flags relevant to bf16, and versions."""
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "processor": platform.processor() or None,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
        for line in cpuinfo.splitlines():
            if line.startswith("model name"):
                info["cpu_model"] = line.split(":", 1)[1].strip()
                break
        flags = next(
            (ln.split(":", 1)[1].split() for ln in cpuinfo.splitlines() if ln.startswith("flags")), []
        )
        info["cpu_flags"] = sorted(f for f in flags if f.startswith(("avx512", "amx", "avx2", "fma")))
    except OSError:
        pass
    # malloc tuning from the environment applies to every job, under any --malloc policy
    info["malloc_env"] = {
        k: v
        for k, v in sorted(os.environ.items())
        if k.startswith("MALLOC_") or k in ("GLIBC_TUNABLES", "LD_PRELOAD")
    }
    try:
        meminfo = Path("/proc/meminfo").read_text().split()
        info["memory_gib"] = round(int(meminfo[meminfo.index("MemTotal:") + 1]) / 2**20, 2)
    except (OSError, ValueError):
        pass
    return info


class BenchRun:
    """Runs the jobs of a :class:`BenchPlan` and keeps ``results.json`` current."""

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
            "versions": versions_record(),
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
                    [sys.executable, "-m", "sam3_exportable.bench_worker", str(spec_file), str(result_file)],
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

    def run(self) -> dict[str, Any]:
        plan = self.plan
        self.doc.setdefault(
            "started", datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        )
        start = time.perf_counter()
        self.job(
            "matmul_peak",
            {
                "job": "matmul_peak",
                "n": plan.matmul_n,
                "runs": plan.matmul_runs,
                "dtypes": ["float32", "bfloat16"],
            },
        )
        self._import_torch()
        fp32 = self.artifact("sam3.pt2")
        bf16 = self.artifact("sam3-bf16.pt2")
        aoti = self.artifact("sam3.aoti.pt2")
        self.job("export/fp32", {"job": "export", "autocast": "none", "out": str(fp32)})
        if "bf16" in plan.variants:
            self.job("export/bf16", {"job": "export", "autocast": "bf16", "out": str(bf16)})
        if plan.aoti:
            self.job(
                "aoti_compile",
                {
                    "job": "aoti_compile",
                    "pt2": str(fp32),
                    "out": str(aoti),
                    "inductor_configs": plan.inductor_configs,
                },
            )
        loads = [("read", fp32), ("pt2", fp32), ("pt2-torch", fp32)] + ([("aoti", aoti)] if plan.aoti else [])
        for how, path in loads:
            for i in range(plan.load_runs):
                self.job(f"load/{how}/{i}", {"job": "load", "how": how, "path": str(path)})
        paths = {"eager": None, "exported": fp32, "aoti": aoti, "bf16": bf16}
        for b, p in plan.shapes:
            for variant in plan.variants:
                if variant in ("aoti", "bf16") and (b, p) not in plan.other_shapes:
                    continue
                warmup, runs = plan.warmup, plan.runs
                if variant == "bf16" and f"latency/bf16/{b}x{p}" not in self.jobs:
                    warmup, runs = self._bf16_runs(b, p)
                    if runs == 0:
                        continue
                spec = {
                    "job": "latency",
                    "variant": variant,
                    "path": str(paths[variant]) if paths[variant] else None,
                    "shape": [b, p],
                    "warmup": warmup,
                    "runs": runs,
                    "count_flops": variant == "eager" and warmup > 0,
                    "save_outputs": str(self.artifact(f"out-{variant}-{b}x{p}.pt"))
                    if (b, p) == (1, 1)
                    else None,
                }
                reduced = variant == "bf16" and (warmup, runs) != (plan.warmup, plan.runs)
                self.job(
                    f"latency/{variant}/{b}x{p}", spec, timeout_s=plan.bf16_cap_s + 180 if reduced else None
                )
        applied = self.jobs.get("matmul_peak", {}).get("malloc", {}).get("applied")
        if plan.malloc != "default" and not applied:
            self.log(f"[allocator] policy {plan.malloc!r} was not applied in the jobs: no baseline run")
        elif plan.malloc != "default":
            # the same eager forward with malloc's settings unchanged: what the policy changes
            self.job(
                "allocator/eager-default/1x1",
                {
                    "job": "latency",
                    "variant": "eager",
                    "path": None,
                    "shape": [1, 1],
                    "warmup": plan.warmup,
                    "runs": plan.runs,
                    "malloc": "default",
                    "save_outputs": str(self.artifact("out-eager-default-malloc-1x1.pt")),
                },
            )
        self._scaling(fp32)
        if plan.profile:
            self._profiles(fp32, bf16)
        self.doc["total_wall_s"] = self.doc.get("total_wall_s", 0.0) + time.perf_counter() - start
        self.summarize()
        self.save()
        return self.doc

    def _bf16_runs(self, b: int, p: int) -> tuple[int, int]:
        """(warm-up, timed runs) for bf16 at (b, p): the plan's, unless bf16 matmul is slower
        than fp32 here (no bf16 instructions) and that many forwards would exceed
        ``bf16_cap_s``; then one cold run, or none (recorded in ``bf16_skipped``)."""
        plan = self.plan
        peaks = self.jobs.get("matmul_peak", {})
        eager = self.jobs.get(f"latency/eager/{b}x{p}", {})
        try:
            slowdown = statistics.median(peaks["float32"]["gflops"]) / statistics.median(
                peaks["bfloat16"]["gflops"]
            )
        except (KeyError, ZeroDivisionError, statistics.StatisticsError):
            return plan.warmup, plan.runs
        if slowdown <= 1.0 or not eager.get("seconds"):
            return plan.warmup, plan.runs
        predicted = statistics.median(eager["seconds"]) * slowdown
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
            self.log(f"[latency/bf16/{b}x{p}] one cold run only: predicted {predicted:.0f} s per forward")
            return 0, 1
        self.log(f"[latency/bf16/{b}x{p}] skipped: predicted {predicted:.0f} s per forward")
        return 0, 0

    def _import_torch(self) -> None:
        """Import times of torch, then torchvision, each in a bare fresh interpreter."""
        if "imports" in self.jobs:
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
        self.jobs["imports"] = runs
        self.save()

    def _scaling_spec(self, path: Path, b: int, p: int, warmup: int, runs: int) -> dict[str, Any]:
        return {
            "job": "latency",
            "variant": "exported",
            "path": str(path),
            "shape": [b, p],
            "warmup": warmup,
            "runs": runs,
        }

    def _scaling(self, fp32: Path) -> None:
        """Exported ``.pt2`` at (1, P) and (B, 1); points already measured by the latency
        matrix with the same settings are reused, the rest run while the budget lasts."""
        plan = self.plan
        matrix = {(b, p) for b, p in plan.shapes} if "exported" in plan.variants else set()
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
            key = f"scaling/{b}x{p}"
            if key not in self.jobs:
                predicted = self._predict_seconds(b, p) * (plan.scaling_warmup + plan.scaling_runs) + 30
                if predicted > budget:
                    skipped.append(
                        {"shape": [b, p], "predicted_s": round(predicted, 1), "budget_left_s": budget}
                    )
                    self.log(f"[{key}] skipped: predicted {predicted:.0f} s > budget left {budget:.0f} s")
                    continue
            result = self.job(key, self._scaling_spec(fp32, b, p, plan.scaling_warmup, plan.scaling_runs))
            budget -= result.get("process_wall_s", 0.0)
        self.doc["scaling_skipped"] = skipped

    def _predict_seconds(self, b: int, p: int) -> float:
        """Linear model from the exported (1,1) and (1,8) latencies (a rough budget guide)."""

        def median(key: str) -> float | None:
            res = self.jobs.get(key, {})
            return statistics.median(res["seconds"]) if res.get("seconds") else None

        t11 = median("latency/exported/1x1") or 1.0
        t18 = median("latency/exported/1x8")
        per_prompt = (t18 - t11) / 7 if t18 else t11 * 0.2
        return b * (t11 + per_prompt * (p - 1))

    def _profiles(self, fp32: Path, bf16: Path) -> None:
        """Op-level profile of one (1,1) forward per artifact, and a cProfile of the load."""
        self.job("profile/load", {"job": "profile_load", "path": str(fp32)})
        reduced = bool(self.doc.get("bf16_reduced"))
        for name, path in (("exported", fp32), ("bf16", bf16)):
            if name == "bf16" and reduced:
                continue  # its matmul peak already says why; one more slow forward adds nothing
            if name in self.plan.variants:
                self.job(f"profile/{name}", {"job": "profile", "path": str(path), "shape": [1, 1]})

    # -- summary ------------------------------------------------------------------------
    def summarize(self) -> None:
        jobs = self.jobs
        doc = self.doc
        peaks = jobs.get("matmul_peak", {})
        doc["matmul_peak_gflops"] = {
            key: stat(peaks[dt]["gflops"])
            for key, dt in (("fp32", "float32"), ("bf16", "bfloat16"))
            if dt in peaks
        }
        doc["export"] = {}
        for kind in ("fp32", "bf16"):
            res = jobs.get(f"export/{kind}")
            if res and "error" not in res:
                doc["export"][kind] = {
                    "build_s": stat([res["build_s"]]),
                    "export_s": stat([res["export_s"]]),
                    "save_s": stat([res["save_s"]]),
                    "peak_rss_gib": stat([res["peak_rss"] / GIB]),
                    "size_mib": res["size_bytes"] / 2**20,
                    "graph_nodes": res["nodes"],
                    "audit": res["audit"],
                }
        res = jobs.get("aoti_compile")
        if res and "error" not in res:
            doc["aoti"] = {
                "compile_s": stat([res["compile_s"]]),
                "peak_rss_gib": stat([res["peak_rss"] / GIB]),
                "size_mib": res["size_bytes"] / 2**20,
                "inductor_configs": res["inductor_configs"],
            }
        else:
            doc["aoti"] = {"skipped": "--quick" if not self.plan.aoti else "compile failed"}
        doc["load"] = {}
        if jobs.get("imports"):
            doc["load"]["import_torch_s"] = stat([r["torch_s"] for r in jobs["imports"]])
            doc["load"]["import_torchvision_s"] = stat([r["torchvision_s"] for r in jobs["imports"]])
        for how in ("read", "pt2", "pt2-torch", "aoti"):
            runs = [jobs[k] for k in jobs if k.startswith(f"load/{how}/") and "error" not in jobs[k]]
            if runs:
                doc["load"][how.replace("-", "_")] = {
                    "seconds": stat([r["seconds"] for r in runs]),
                    "peak_rss_gib": stat([r["peak_rss"] / GIB for r in runs]),
                }
        doc["latency"] = self._latency_rows()
        doc["allocator"] = self._allocator()
        doc["parity"] = self._parity()
        doc["scaling"] = self._scaling_summary()
        doc["targets"] = self._targets()

    def _latency_rows(self) -> list[dict[str, Any]]:
        rows = []
        peaks = self.doc["matmul_peak_gflops"]
        flops_by_shape = {}
        for b, p in self.plan.shapes:
            res = self.jobs.get(f"latency/eager/{b}x{p}", {})
            if "flops" in res:
                flops_by_shape[(b, p)] = res["flops"]
        for b, p in self.plan.shapes:
            eager = self.jobs.get(f"latency/eager/{b}x{p}", {})
            for variant in self.plan.variants:
                if variant in ("aoti", "bf16") and (b, p) not in self.plan.other_shapes:
                    continue
                res = self.jobs.get(f"latency/{variant}/{b}x{p}")
                if not res or "error" in res:
                    rows.append(
                        {"variant": variant, "B": b, "P": p, "error": (res or {}).get("error", "not run")}
                    )
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
                if eager.get("seconds"):
                    row["ratio_to_eager"] = median / statistics.median(eager["seconds"])
                    row["speedup_vs_eager"] = statistics.median(eager["seconds"]) / median
                flops = flops_by_shape.get((b, p))
                if flops:
                    row["flops"] = flops
                    row["achieved_gflops"] = flops / median / 1e9
                    peak_key = "bf16" if variant == "bf16" else "fp32"
                    if peak_key in peaks:
                        row["fraction_of_matmul_peak"] = row["achieved_gflops"] / peaks[peak_key]["median"]
                        row["matmul_peak_used"] = peak_key
                rows.append(row)
        return rows

    def _allocator(self) -> dict[str, Any]:
        """Whether the plan's malloc policy held in every job, and eager at (1,1) under it and
        with malloc's settings unchanged (``--malloc default``)."""
        records = [
            job["malloc"]
            for key, job in self.jobs.items()
            if isinstance(job, dict) and "malloc" in job and not key.startswith("allocator/")
        ]
        out: dict[str, Any] = {
            "policy": self.plan.malloc,
            "applied_in_every_job": bool(records) and all(r["applied"] for r in records),
            "reasons": sorted({r["reason"] for r in records}),
        }
        for name, key in (
            ("with_policy", "latency/eager/1x1"),
            ("with_default", "allocator/eager-default/1x1"),
        ):
            res = self.jobs.get(key)
            if res and res.get("seconds"):
                out[name] = {
                    "seconds": stat(res["seconds"]),
                    "applied": res.get("malloc", {}).get("applied"),
                    "minor_faults_per_run": res.get("minor_faults_per_run"),
                    "system_s_per_run": res.get("system_s_per_run"),
                    "peak_rss_gib": res["peak_rss"] / GIB,
                }
        if "with_policy" in out and "with_default" in out:
            out["speedup"] = (
                out["with_default"]["seconds"]["median"] / out["with_policy"]["seconds"]["median"]
            )
        paths = [self.artifact(f"out-eager{tag}-1x1.pt") for tag in ("", "-default-malloc")]
        if "with_policy" in out and "with_default" in out and all(path.is_file() for path in paths):
            bitwise = compare_parity(*(torch.load(path) for path in paths))["bitwise"]
            out["outputs_bitwise_equal"] = all(bitwise.values())
        return out

    def _parity(self) -> dict[str, Any]:
        out: dict[str, Any] = {"shape": [1, 1]}
        ref_path = self.artifact("out-eager-1x1.pt")
        if not ref_path.is_file():
            return out
        reference = torch.load(ref_path)
        for variant in ("exported", "aoti", "bf16"):
            path = self.artifact(f"out-{variant}-1x1.pt")
            if path.is_file():
                key = "bf16_vs_fp32_eager" if variant == "bf16" else f"{variant}_vs_eager"
                out[key] = compare_parity(reference, torch.load(path))
        return out

    def _scaling_summary(self) -> dict[str, Any]:
        def point(b: int, p: int) -> dict[str, Any] | None:
            for key in (f"latency/exported/{b}x{p}", f"scaling/{b}x{p}"):
                res = self.jobs.get(key)
                if res and res.get("seconds"):
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

        prompts = sorted({1, *self.plan.scaling_prompts})
        batches = sorted({1, *self.plan.scaling_batches})
        by_p = [pt for p in prompts if (pt := point(1, p))]
        by_b = [pt for b in batches if (pt := point(b, 1))]

        def fit(points: list[dict[str, Any]], axis: str, field: str) -> dict[str, float] | None:
            return linear_fit([pt[axis] for pt in points], [pt[field]["median"] for pt in points])

        return {
            "variant": "exported",
            "budget_s": self.plan.scaling_budget_s,
            "prompts_at_B1": by_p,
            "batches_at_P1": by_b,
            "skipped": self.doc.get("scaling_skipped", []),
            "seconds_per_extra_prompt": (f := fit(by_p, "P", "seconds")) and f["slope"],
            "gib_per_extra_prompt": (f := fit(by_p, "P", "peak_rss_gib")) and f["slope"],
            "seconds_per_extra_image": (f := fit(by_b, "B", "seconds")) and f["slope"],
            "gib_per_extra_image": (f := fit(by_b, "B", "peak_rss_gib")) and f["slope"],
        }

    def _targets(self) -> list[dict[str, Any]]:
        """The issue's speed targets, each with its measured value (None: not measured)."""
        rows = {(r["variant"], r["B"], r["P"]): r for r in self.doc["latency"] if "seconds" in r}

        def field(variant: str, b: int, p: int, key: str) -> float | None:
            return rows.get((variant, b, p), {}).get(key)

        aoti = self.doc.get("aoti", {})
        load = self.doc["load"].get("pt2")
        p32 = next((pt for pt in self.doc["scaling"]["prompts_at_B1"] if pt["P"] == 32), None)
        # (name, comparison, bound as written in the issue, measured value, unit)
        specs: list[tuple[str, str, str, float | None, str]] = [
            (
                f"exported latency / eager at ({b},{p})",
                "<=",
                "1.00",
                field("exported", b, p, "ratio_to_eager"),
                "x",
            )
            for b, p in self.plan.shapes
        ]
        specs += [
            (
                "bf16 .pt2 speed-up over fp32 eager at (1,1)",
                ">=",
                "1.8",
                field("bf16", 1, 1, "speedup_vs_eager"),
                "x",
            ),
            (
                "AOTInductor speed-up over eager at (1,1)",
                ">=",
                "1.1",
                field("aoti", 1, 1, "speedup_vs_eager"),
                "x",
            ),
            (
                "AOTInductor compile time",
                "<",
                "360",
                aoti["compile_s"]["median"] if "compile_s" in aoti else None,
                "s",
            ),
            (
                "fresh-process load of the .pt2 (load_pipeline)",
                "<=",
                "10",
                load and load["seconds"]["median"],
                "s",
            ),
            ("peak RSS at B=1, P=32", "<=", "16", p32 and p32["peak_rss_gib"]["max"], "GiB"),
        ]
        return [
            {
                "name": name,
                "target": f"{op} {bound}",
                "measured": measured,
                "unit": unit,
                "met": None if measured is None else TARGET_COMPARISONS[op](measured, float(bound)),
            }
            for name, op, bound, measured, unit in specs
        ]


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
        raise FileExistsError(f"{results}: exists; pass --resume to continue it or --force to start over")
    out.mkdir(parents=True, exist_ok=True)
    work = Path(work_dir) if work_dir else out / "work"
    work.mkdir(parents=True, exist_ok=True)
    runner = BenchRun(plan, out, work, resume=resume and results.exists(), log=log, command=command)
    doc = runner.run()
    from .bench_report import markdown_summary

    with atomic_write(out / "summary.md", force=True) as tmp:
        tmp.write_text(markdown_summary(doc))
    if plots:
        from .bench_plots import write_plots

        doc["plots"] = write_plots(doc, out)
        runner.save()
    return doc
