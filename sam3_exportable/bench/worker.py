"""One benchmark job, run in a fresh process by :mod:`.run`.

``python -m sam3_exportable.bench.worker SPEC.json RESULT.json`` runs the job that
``SPEC.json`` describes and writes its figures to ``RESULT.json``. Each job kind is a
function below taking the spec dict and returning a JSON-able dict. A fresh process per
job keeps figures independent: peak RSS (``ru_maxrss``) is the job's own, and no allocator
or kernel cache carries over from another configuration.

Jobs that run an artifact load it with :func:`..artifact.loader.load_artifact` and import
only torch, torchvision and this package's loading side, as a serving process would;
``eager`` builds the model with upstream ``sam3``.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..allocator import peak_rss_bytes
from ..artifact.manifest import Manifest
from .online import job_serve
from .throughput import job_throughput

__all__ = ["JOBS", "main", "peak_rss_bytes", "rss_bytes"]


def rss_bytes() -> int:
    """Current resident set size (``/proc/self/statm``; falls back to the peak)."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return peak_rss_bytes()


def _timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - start


def job_matmul_peak(spec: dict[str, Any]) -> dict[str, Any]:
    """GFLOP/s of an ``n x n x n`` product per dtype, through ``torch.mm`` and through
    ``F.linear`` (the op the model's layers use; under autocast it takes oneDNN's path):
    ``runs`` timed after one warm-up each. The peak is the faster of the two."""
    import torch.nn.functional as F

    n, runs = int(spec["n"]), int(spec["runs"])
    out: dict[str, Any] = {"n": n, "threads": torch.get_num_threads()}
    for name in spec["dtypes"]:
        dtype = getattr(torch, name)
        a = torch.randn(n, n)
        b = torch.randn(n, n)
        # Without bf16 instructions a low-precision torch.mm runs at ~1 GFLOP/s: size it down.
        m = n if dtype == torch.float32 else min(n, 1024)
        am, bm = a[:m, :m].to(dtype), b[:m, :m].to(dtype)
        ops = {
            "mm": (m, lambda am=am, bm=bm: torch.mm(am, bm)),
            "linear": (n, lambda a=a, b=b, dtype=dtype: _linear_as(F, a, b, dtype)),
        }
        per_op = {}
        for op, (size, fn) in ops.items():
            fn()
            times = [_timed(fn)[1] for _ in range(runs)]
            per_op[op] = {"n": size, "seconds": times, "gflops": [2 * size**3 / t / 1e9 for t in times]}
        best = max(per_op, key=lambda op: sorted(per_op[op]["gflops"])[len(per_op[op]["gflops"]) // 2])
        out[name] = {**per_op[best], "op": best, "by_op": per_op}
    return out


def _linear_as(F: Any, a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``F.linear`` in ``dtype``: fp32 directly, lower precision under CPU autocast."""
    if dtype == torch.float32:
        return F.linear(a, b)
    with torch.autocast("cpu", dtype=dtype):
        return F.linear(a, b)


def _build(spec: dict[str, Any]) -> torch.nn.Module:
    from ..export.builders import build_model

    return build_model(spec["size"], seed=int(spec.get("seed", 0)))


def job_export(spec: dict[str, Any]) -> dict[str, Any]:
    """The export recipe (build, export, audit, save each of ``formats``, ``quantize``):
    stage times, peak RSS after each stage, the size of each kind written."""
    from ..export.recipe import build_artifact
    from ..progress import Stages

    out: dict[str, Any] = {}

    def record(stage: str, seconds: float) -> None:
        out[f"{stage}_s"] = seconds
        out[f"peak_rss_after_{stage}"] = peak_rss_bytes()

    record_ = build_artifact(
        spec["out"],
        size=spec["size"],
        seed=int(spec.get("seed", 0)),
        autocast=spec.get("autocast", "none"),
        formats=spec.get("formats", ["pt2"]),
        quantize=spec.get("quantize"),
        boxes=bool(spec.get("boxes", False)),
        staged=bool(spec.get("staged", False)),
        force=True,
        stages=Stages(on_done=record),
    )
    out["audit"] = record_.audit.summary()
    out["sizes_bytes"] = {kind: _artifact_bytes(m) for kind, m in record_.manifests.items()}
    out["size_bytes"] = next(iter(out["sizes_bytes"].values()))
    out["nodes"] = len(record_.program.graph.nodes)
    out["peak_rss"] = peak_rss_bytes()
    return out


def _artifact_bytes(manifest: Manifest) -> int:
    """Bytes of an artifact: its file plus any data files beside it (ONNX weights)."""
    assert manifest.file is not None
    return sum(int(f.size_bytes or 0) for f in (manifest.file, *manifest.data_files))


def job_aoti_compile(spec: dict[str, Any]) -> dict[str, Any]:
    """Load a saved ``.pt2`` and compile it into an AOTInductor package."""
    from ..artifact.aoti import compile_aoti
    from ..artifact.pt2 import load_pipeline

    loaded, load_s = _timed(lambda: load_pipeline(spec["pt2"]))
    manifest = compile_aoti(
        loaded.program,
        spec["out"],
        source_manifest=loaded.manifest,
        inductor_configs=spec.get("inductor_configs"),
        force=True,
    )
    assert manifest.aoti is not None
    return {
        "load_s": load_s,
        "compile_s": manifest.aoti.compile_seconds,
        "size_bytes": _artifact_bytes(manifest),
        "inductor_configs": dict(manifest.aoti.inductor_configs),
        "peak_rss": peak_rss_bytes(),
    }


def _read_file(path: str, chunk: int = 1 << 24) -> int:
    total = 0
    with open(path, "rb", buffering=0) as fh:
        while block := fh.read(chunk):
            total += len(block)
    return total


def job_load(spec: dict[str, Any]) -> dict[str, Any]:
    """Fresh-process load of an artifact (``how``: ``pt2`` through ``load_pipeline``,
    ``pt2-torch`` through ``torch.export.load``, ``aoti``, or ``read``: read every byte).

    Only the call is timed; import times are measured separately by the parent.
    """
    import torchvision  # noqa: F401

    how, path = spec["how"], spec["path"]
    if how == "read":
        _, seconds = _timed(lambda: _read_file(path))
    elif how in ("pt2", "aoti"):
        from ..artifact.loader import load_artifact

        _, seconds = _timed(lambda: load_artifact(path))
    elif how == "pt2-torch":
        _, seconds = _timed(lambda: torch.export.load(path))
    else:
        raise ValueError(f"load job: expected how in pt2, pt2-torch, aoti, read; got {how!r}")
    return {"seconds": seconds, "peak_rss": peak_rss_bytes()}


def _runner(spec: dict[str, Any]) -> tuple[Callable[..., Any], int, int, float]:
    """(callable, image size, context length, load seconds) for the job's variant."""
    variant = spec["variant"]
    start = time.perf_counter()
    if variant == "eager":
        from ..export.pipeline import FullSam3PipelineWrapper
        from ..patching.selection import exportable_sam3

        wrapper = FullSam3PipelineWrapper(_build(spec)).eval()

        def run_eager(images: torch.Tensor, tokens: torch.Tensor) -> Any:
            with exportable_sam3():
                return wrapper(images, tokens)

        return run_eager, wrapper.image_size, wrapper.context_length, time.perf_counter() - start
    from ..artifact.loader import load_artifact

    artifact = load_artifact(spec["path"])
    return artifact, artifact.image_size, artifact.context_length, time.perf_counter() - start


def job_latency(spec: dict[str, Any]) -> dict[str, Any]:
    """``warmup`` untimed then ``runs`` timed forwards at (B, P), under inference mode.

    With ``boxes: K`` a box-capable artifact also gets K exemplar boxes per pair, every one
    valid (:func:`.boxes.synthetic_box_inputs`). With ``count_flops`` the first warm-up runs under
    ``torch.utils.flop_counter``. With ``save_outputs`` the last outputs are written there
    (``torch.save``) for parity checks.
    """
    import torchvision  # noqa: F401

    from .boxes import synthetic_box_inputs

    batch, prompts = (int(v) for v in spec["shape"])
    module, image_size, context_length, load_s = _runner(spec)
    rss_loaded = rss_bytes()
    seed = int(spec.get("input_seed", 1))
    inputs = synthetic_box_inputs(image_size, context_length, batch, prompts, spec.get("boxes"), seed=seed)
    out: dict[str, Any] = {"load_s": load_s, "rss_after_load": rss_loaded}
    outputs: Any = None
    with torch.inference_mode():
        for i in range(int(spec["warmup"])):
            if i == 0 and spec.get("count_flops"):
                from torch.utils.flop_counter import FlopCounterMode

                counter = FlopCounterMode(display=False)
                with counter:
                    outputs, seconds = _timed(lambda: module(*inputs))
                out["flops"] = int(counter.get_total_flops())
            else:
                outputs, seconds = _timed(lambda: module(*inputs))
            out.setdefault("warmup_s", []).append(seconds)
        times = []
        before = resource.getrusage(resource.RUSAGE_SELF)
        for _ in range(int(spec["runs"])):
            outputs, seconds = _timed(lambda: module(*inputs))
            times.append(seconds)
        after = resource.getrusage(resource.RUSAGE_SELF)
    out["seconds"] = times
    if times:
        # kernel work the timed runs caused: first-touch page faults of fresh allocations
        out["minor_faults_per_run"] = (after.ru_minflt - before.ru_minflt) / len(times)
        out["system_s_per_run"] = (after.ru_stime - before.ru_stime) / len(times)
    out["peak_rss"] = peak_rss_bytes()
    if spec.get("save_outputs") and outputs is not None:
        torch.save(tuple(t.detach().float().clone() for t in outputs), spec["save_outputs"])
    return out


def job_geometry_share(spec: dict[str, Any]) -> dict[str, Any]:
    """Eager forwards at (1, 1) in each configuration of :func:`.boxes.box_configurations`
    (``counts``): one warm-up in all, then ``runs`` timed forwards per configuration, with the seconds spent
    inside ``model.geometry_encoder`` (forward hooks) and their share of the forward."""
    from ..export.pipeline import FullSam3PipelineWrapper
    from ..patching.selection import exportable_sam3
    from .boxes import box_configurations, synthetic_box_inputs

    wrapper = FullSam3PipelineWrapper(_build(spec)).eval()
    encoder = wrapper.model.geometry_encoder
    inside: list[float] = []
    started: list[float] = []
    encoder.register_forward_pre_hook(lambda *_: started.append(time.perf_counter()))
    encoder.register_forward_hook(lambda *_: inside.append(time.perf_counter() - started.pop()))
    configurations = box_configurations([int(k) for k in spec["counts"]])
    out: dict[str, dict[str, list[float]]] = {}
    with torch.inference_mode(), exportable_sam3():
        for i, (name, configuration) in enumerate(configurations):
            inputs = synthetic_box_inputs(wrapper.image_size, wrapper.context_length, 1, 1, configuration)
            if i == 0:  # first-touch allocations land here, not in a timed forward
                wrapper(*inputs)
            record = out.setdefault(name, {"forward_s": [], "geometry_s": [], "share": []})
            for _ in range(int(spec.get("runs", 1))):
                inside.clear()
                _, total = _timed(lambda: wrapper(*inputs))  # noqa: B023  called at once
                record["forward_s"].append(total)
                record["geometry_s"].append(sum(inside))
                record["share"].append(sum(inside) / total)
    return {"by_configuration": out}


def job_profile(spec: dict[str, Any]) -> dict[str, Any]:
    """One forward of an artifact at (B, P) under ``torch.profiler``: the top ops by self
    CPU time (where the time goes when a speed target is missed)."""
    import torchvision  # noqa: F401
    from torch.profiler import ProfilerActivity, profile

    from ..artifact.loader import load_artifact
    from ..artifact.program import synthetic_inputs

    module = load_artifact(spec["path"])
    batch, prompts = (int(v) for v in spec["shape"])
    inputs = synthetic_inputs(module.image_size, module.context_length, batch, prompts, seed=1)
    with torch.inference_mode():
        module(*inputs)  # warm-up: the profile is of a steady-state forward
    with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU]) as prof:
        _, seconds = _timed(lambda: module(*inputs))
    averages = prof.key_averages()
    total_us = sum(e.self_cpu_time_total for e in averages) or 1
    top = sorted(averages, key=lambda e: e.self_cpu_time_total, reverse=True)[: int(spec.get("top", 20))]
    return {
        "seconds": seconds,
        "top_ops_by_self_cpu": [
            {
                "op": e.key,
                "self_cpu_s": e.self_cpu_time_total / 1e6,
                "share": e.self_cpu_time_total / total_us,
                "calls": e.count,
            }
            for e in top
        ],
    }


def job_profile_load(spec: dict[str, Any]) -> dict[str, Any]:
    """``load_pipeline`` under cProfile: the functions with the largest cumulative time."""
    import cProfile
    import io
    import pstats

    import torchvision  # noqa: F401

    from ..artifact.pt2 import load_pipeline

    prof = cProfile.Profile()
    start = time.perf_counter()
    prof.enable()
    load_pipeline(spec["path"])
    prof.disable()
    seconds = time.perf_counter() - start
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("cumulative").print_stats(int(spec.get("top", 30)))
    lines = [ln for ln in text.getvalue().splitlines() if ln.strip()]
    return {"seconds_under_profiler": seconds, "cprofile_top_cumulative": lines}


def job_follow_up(spec: dict[str, Any]) -> dict[str, Any]:
    """One image asked ``phrases`` phrases in turn through the staged ``.pt2`` at ``path``:
    after a warm-up call on another image, one call per phrase with the feature cache
    (``cached_s``: the first encodes the image, the others run the prompt stage alone), then
    the same calls without a cache (``uncached_s``: each encodes the image again)."""
    import numpy as np
    from PIL import Image

    from ..artifact.loader import load_artifact
    from ..predict import Predictor

    artifact, load_s = _timed(lambda: load_artifact(spec["path"]))
    rng = np.random.default_rng(int(spec.get("seed", 0)))
    warm, image = (Image.fromarray(rng.integers(0, 255, (480, 640, 3), dtype=np.uint8)) for _ in range(2))
    phrases = [f"object number {i}" for i in range(int(spec["phrases"]))]
    cached, uncached = Predictor(artifact), Predictor(artifact, cache_bytes=0)
    _, warmup_s = _timed(lambda: cached.kept_pairs([warm], phrases[:1]))
    out: dict[str, Any] = {"load_s": load_s, "warmup_s": warmup_s, "cached_s": [], "uncached_s": []}
    for predictor, key in ((cached, "cached_s"), (uncached, "uncached_s")):
        for phrase in phrases:
            _, seconds = _timed(lambda p=predictor, q=phrase: p.kept_pairs([image], [q]))
            out[key].append(seconds)
    out["cache"] = {"hits": cached.cache.hits, "misses": cached.cache.misses, "bytes": cached.cache.bytes}
    out["peak_rss"] = peak_rss_bytes()
    return out


JOBS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "matmul_peak": job_matmul_peak,
    "export": job_export,
    "aoti_compile": job_aoti_compile,
    "load": job_load,
    "latency": job_latency,
    "profile": job_profile,
    "profile_load": job_profile_load,
    "throughput": job_throughput,
    "geometry_share": job_geometry_share,
    "follow_up": job_follow_up,
    "serve": job_serve,
}


def main(argv: list[str] | None = None) -> int:
    import logging
    import warnings

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python -m sam3_exportable.bench.worker SPEC.json RESULT.json", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.ERROR)
    warnings.filterwarnings("ignore")
    spec = json.loads(Path(args[0]).read_text())
    from ..allocator import apply_malloc_policy

    # the bench always names the policy; a hand-written spec without one changes nothing
    malloc = apply_malloc_policy(spec.get("malloc", "default"))
    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    job = JOBS[spec["job"]]
    result = job(spec)
    result.setdefault("threads", torch.get_num_threads())
    result["malloc"] = malloc
    result["python"] = platform.python_version()
    Path(args[1]).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
