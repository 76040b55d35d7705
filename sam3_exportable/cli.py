"""The ``sam3-exportable`` command line."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import torch

from .errors import (
    ArtifactError,
    CheckpointError,
    DynamicShapeAuditError,
    InputSpecError,
    UpstreamMismatchError,
)

__all__ = ["main"]

T = TypeVar("T")

AUTOCAST = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class Progress:
    """Prints ``[stage] ... done in X s`` lines and keeps the timings."""

    def __init__(self, stream: Any = None) -> None:
        self.stream = stream or sys.stdout
        self.timings: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str, detail: str = "") -> Iterator[None]:
        print(f"[{name}] {detail}".rstrip(), file=self.stream, flush=True)
        start = time.perf_counter()
        yield
        self.timings[name] = time.perf_counter() - start
        print(f"[{name}] done in {self.timings[name]:.1f} s", file=self.stream, flush=True)


def _shape(text: str) -> tuple[int, int]:
    try:
        b, p = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected B,P (two integers), got {text!r}") from None
    if b < 1 or p < 1:
        raise argparse.ArgumentTypeError(f"expected B >= 1 and P >= 1, got {text!r}")
    return b, p


def compare_outputs(
    expected: Sequence[torch.Tensor], got: Sequence[torch.Tensor]
) -> list[tuple[str, float, bool]]:
    """(name, max |diff|, bitwise equal) per output, in ``OUTPUT_NAMES`` order."""
    from .pipeline import OUTPUT_NAMES

    rows = []
    for name, a, b in zip(OUTPUT_NAMES, expected, got, strict=True):
        same_shape = a.shape == b.shape
        a, b = a.detach(), b.detach()
        diff = float((a.double() - b.double()).abs().max()) if same_shape and a.numel() else 0.0
        rows.append((name, diff if same_shape else float("inf"), same_shape and torch.equal(a, b)))
    return rows


def export_command(args: argparse.Namespace) -> int:
    from . import __version__
    from .artifact import save_pipeline
    from .builders import BPE_VOCAB_SHA256, build_model
    from .export import audit_dynamic_shapes, example_inputs, export_full_pipeline
    from .patch_set import exportable_sam3, select_patches
    from .pipeline import OUTPUT_NAMES, FullSam3PipelineWrapper

    out = Path(args.out)
    if not args.force:
        from .aoti import aoti_path_for

        planned = [out, Path(f"{out}.json")]
        if args.aoti:
            planned += [aoti_path_for(out), Path(f"{aoti_path_for(out)}.json")]
        for existing in planned:
            if existing.exists():
                raise FileExistsError(f"--out {existing}: exists; pass --force to overwrite")
    if args.threads:
        torch.set_num_threads(args.threads)
    autocast = AUTOCAST[args.autocast]
    progress = Progress()
    weights = f"checkpoint {args.checkpoint}" if args.checkpoint else f"random weights, seed {args.seed}"
    with progress.stage("build", f"size={args.size}, {weights}"):
        model = build_model(args.size, checkpoint=args.checkpoint, seed=args.seed)
        n_params = sum(p.numel() for p in model.parameters())
        print(f"  {n_params:,} parameters", flush=True)
    with progress.stage("export", f"non-strict, autocast={args.autocast}"):
        ep = export_full_pipeline(model, autocast_dtype=autocast, audit=False)
    with progress.stage("audit"):
        report = audit_dynamic_shapes(ep)
        print(f"  {report.summary()}", flush=True)
    wrapper = FullSam3PipelineWrapper(model, autocast_dtype=autocast).eval()
    patches = [p.name for p in select_patches()]
    metadata = {
        "model": {
            "size": args.size,
            "parameters": n_params,
            "checkpoint": str(args.checkpoint) if args.checkpoint else None,
            "random_weights": args.checkpoint is None,
            "seed": args.seed if args.checkpoint is None else None,
        },
        "image_size": wrapper.image_size,
        "context_length": wrapper.context_length,
        "vocab_size": wrapper.vocab_size,
        "normalize": {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]},
        "tokenizer": {
            "kind": "sam3.model.tokenizer_ve.SimpleTokenizer",
            "bpe_vocab_sha256": BPE_VOCAB_SHA256,
        },
        "output_names": list(OUTPUT_NAMES),
        "autocast_dtype": args.autocast if autocast is not None else None,
        "strict": False,
        "patches": patches,
        "audit": {"symbols": report.symbols, "ranges": {k: [v[0], "inf"] for k, v in report.ranges.items()}},
        "exported_by": f"sam3-exportable {__version__}",
    }
    with progress.stage("save", str(out)):
        manifest = save_pipeline(ep, out, metadata=metadata, force=args.force)
        print(f"  {manifest['size_bytes'] / 2**20:,.0f} MiB, sha256 {manifest['sha256'][:16]}...", flush=True)
    if args.aoti:
        from .aoti import aoti_path_for, compile_aoti

        package = aoti_path_for(out)
        with progress.stage("aoti", f"AOTInductor package {package} (several minutes at full size)"):
            aoti_manifest = compile_aoti(ep, package, source_manifest=manifest, force=args.force)
            print(f"  {aoti_manifest['size_bytes'] / 2**20:,.0f} MiB", flush=True)
    status = 0
    if args.verify:
        b, p = args.verify
        with progress.stage("verify", f"eager vs exported at B={b}, P={p}"):
            inputs = example_inputs(wrapper, b, p, seed=1)
            with exportable_sam3(), torch.no_grad():
                expected = wrapper(*inputs)
            got = ep.module()(*inputs)
            rows = compare_outputs(expected, got)
            for name, diff, equal in rows:
                print(f"  {name:20s} max|diff| {diff:.3g}  bitwise equal: {equal}", flush=True)
            if all(equal for _, _, equal in rows):
                print("  verify: exported == eager, bitwise", flush=True)
            else:
                print("  verify: exported differs from eager", flush=True)
                status = 1
            if args.aoti:
                from .aoti import load_aoti
                from .bench import compare_parity

                parity = compare_parity(expected, load_aoti(package).module()(*inputs))
                for name, diff in parity["max_abs_diff"].items():
                    print(f"  aoti {name:15s} max|diff| {diff:.3g}", flush=True)
                same = all(v["identical"] for k, v in parity.items() if k.startswith("kept_at_"))
                print(f"  verify: AOTInductor keeps the same instances as eager: {same}", flush=True)
                status = status if same else 1
    total = sum(progress.timings.values())
    print(
        "timings: "
        + ", ".join(f"{k} {v:.1f} s" for k, v in progress.timings.items())
        + f", total {total:.1f} s"
    )
    return status


def predict_command(args: argparse.Namespace) -> int:
    import shutil
    import tempfile

    from .artifact import load_pipeline
    from .outputs import write_results
    from .predict import Predictor, load_image, replace_dir_atomically, validate_phrases

    progress = Progress()
    out = Path(args.out)
    # Every input is checked before anything heavy runs or anything is written.
    phrases = validate_phrases(args.prompt or [])
    if out.exists() and not args.force:
        raise FileExistsError(f"--out {out}: exists; pass --force to overwrite")
    if not 0.0 <= args.threshold <= 1.0:
        raise ValueError(f"--threshold: expected a value in [0, 1], got {args.threshold}")
    images = [load_image(path) for path in args.image]
    with progress.stage("load", str(args.model)):
        loaded = load_pipeline(args.model)
        predictor = Predictor(loaded)
    if loaded.manifest.get("model", {}).get("random_weights"):
        print("  NOTE: this artifact has random weights: its masks are meaningless", flush=True)
    with progress.stage("predict", f"{len(images)} image(s) x {len(phrases)} phrase(s), one graph call"):
        results = predictor.predict(images, phrases, threshold=args.threshold)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp.", dir=out.parent))
    try:
        with progress.stage("write", str(out)):
            model = {"path": str(args.model), "sha256": loaded.manifest.get("sha256")}
            doc = write_results(
                staging, args.image, images, phrases, results, threshold=args.threshold, model=model
            )
            replace_dir_atomically(staging, out, force=args.force)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    for entry in doc["images"]:
        counts = ", ".join(f"{p['phrase']!r}: {len(p['instances'])}" for p in entry["phrases"])
        print(f"  {entry['path']}: {counts}")
        print(f"  overlay: {out / entry['overlay']}")
    print(f"results: {out / 'results.json'}")
    total = sum(progress.timings.values())
    print(
        "timings: "
        + ", ".join(f"{k} {v:.1f} s" for k, v in progress.timings.items())
        + f", total {total:.1f} s"
    )
    return 0


def bench_command(args: argparse.Namespace) -> int:
    from .bench import plan_for, run_bench
    from .bench_report import format_measured

    plan = plan_for(
        args.size,
        args.quick,
        scaling_budget_s=args.scaling_budget,
        all_shapes=args.all_shapes,
        malloc=args.malloc,
    )
    start = time.perf_counter()
    doc = run_bench(
        plan,
        args.out,
        work_dir=args.work_dir,
        resume=args.resume,
        force=args.force,
        command=["sam3-exportable", *args.argv],
    )
    print(f"\nresults: {Path(args.out) / 'results.json'} ({time.perf_counter() - start:.0f} s)")
    for name in doc.get("plots", []):
        print(f"plot: {Path(args.out) / name}")
    print("\ntargets:")
    for t in doc["targets"]:
        measured = format_measured(t) + ("" if t["measured"] is None else f" {t['unit']}")
        verdict = {True: "met", False: "NOT met", None: "-"}[t["met"]]
        print(f"  {t['name']:50s} {t['target']:>7s}  {measured:>14s}  {verdict}")
    failed = [k for k, v in doc["jobs"].items() if isinstance(v, dict) and "error" in v]
    if failed:
        print(f"\n{len(failed)} job(s) failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def doctor_command(args: argparse.Namespace) -> int:
    from .doctor import doctor_rows, format_table

    rows = doctor_rows(strict=args.strict)
    print(format_table(rows))
    broken = [r.patch for r in rows if r.upstream == "missing" or r.fingerprint != "ok"]
    if broken:
        print(f"\n{len(broken)} patch(es) no longer match upstream: {', '.join(broken)}")
        return 1
    return 0


def _add_malloc_argument(parser: argparse.ArgumentParser, what: str = "of this process") -> None:
    from .allocator import MALLOC_POLICIES

    parser.add_argument(
        "--malloc",
        choices=MALLOC_POLICIES,
        default="retain",
        help=f"malloc policy {what}: 'retain' reuses freed memory instead of page-faulting "
        "it in again each forward (same numbers; glibc only; see README)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sam3-exportable",
        description="Export SAM3's text-grounding pipeline to one torch.export .pt2 and run it.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    exp = sub.add_parser("export", help="build, export, audit and save a .pt2 pipeline")
    weights = exp.add_mutually_exclusive_group(required=True)
    weights.add_argument("--checkpoint", type=Path, help="upstream-format SAM3 checkpoint")
    weights.add_argument(
        "--random-weights",
        action="store_true",
        help="deterministic random weights (masks are meaningless; for testing the pipeline)",
    )
    exp.add_argument("--size", choices=["full", "tiny"], default="full")
    exp.add_argument("--seed", type=int, default=0, help="seed for --random-weights")
    exp.add_argument("--out", required=True, help="path of the .pt2 to write")
    exp.add_argument("--autocast", choices=sorted(AUTOCAST), default="none")
    exp.add_argument("--verify", type=_shape, metavar="B,P", help="compare eager and exported")
    exp.add_argument(
        "--aoti",
        action="store_true",
        help="also compile an AOTInductor package <out>.aoti.pt2 from the same program (minutes)",
    )
    exp.add_argument("--force", action="store_true", help="overwrite an existing --out")
    exp.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    _add_malloc_argument(exp)
    exp.set_defaults(func=export_command)

    pred = sub.add_parser("predict", help="segment images by text prompts with a .pt2")
    pred.add_argument("--model", required=True, type=Path, help=".pt2 written by export")
    pred.add_argument("--image", required=True, action="append", type=Path, help="repeatable")
    pred.add_argument("--prompt", action="append", help="a phrase, e.g. 'a dog'; repeatable")
    pred.add_argument("--threshold", type=float, default=0.5)
    pred.add_argument("--out", required=True, help="output directory")
    pred.add_argument("--force", action="store_true", help="replace an existing --out")
    _add_malloc_argument(pred)
    pred.set_defaults(func=predict_command)

    bench = sub.add_parser("bench", help="measure export, load, latency, memory and FLOP/s")
    bench.add_argument("--size", choices=["full", "tiny"], default="full")
    bench.add_argument("--quick", action="store_true", help="tiny only: a couple of minutes")
    bench.add_argument("--out", default="bench", help="directory for results.json and plots")
    bench.add_argument("--work-dir", help="where the bench's artifacts go (default OUT/work)")
    bench.add_argument(
        "--scaling-budget", type=float, help="seconds for full-size scaling points (default 600)"
    )
    bench.add_argument(
        "--all-shapes", action="store_true", help="full size: AOTInductor and bf16 at every shape too"
    )
    bench.add_argument("--resume", action="store_true", help="continue OUT/results.json")
    bench.add_argument("--force", action="store_true", help="start over, replacing OUT/results.json")
    _add_malloc_argument(bench, "of every job's process; eager at (1,1) also runs under 'default'")
    bench.set_defaults(func=bench_command)

    doc = sub.add_parser("doctor", help="report each patch for the installed torch and sam3")
    doc.add_argument("--strict", action="store_true", help="report for strict export")
    doc.set_defaults(func=doctor_command)
    return parser


_EXPECTED_ERRORS = (
    NotImplementedError,
    ArtifactError,
    CheckpointError,
    DynamicShapeAuditError,
    FileExistsError,
    FileNotFoundError,
    InputSpecError,
    UpstreamMismatchError,
    ValueError,
)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``sam3-exportable`` console script; returns the exit status."""
    import logging
    import warnings

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    warnings.filterwarnings("ignore", module=r"sam3\..*")
    warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*")
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    if getattr(args, "malloc", None) and args.func is not bench_command:
        from .allocator import apply_malloc_policy

        apply_malloc_policy(args.malloc)  # bench applies it in each job's own process
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except _EXPECTED_ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
