"""The ``sam3-exportable`` command line: parses arguments, calls the library, prints.

Every failure a user can cause (an argument value, a file, a full disk, an interrupt, an
optional part not installed) ends with one line on stderr naming the input, what was
expected and what came, and exit status 2 (130 after Ctrl-C, 143 after SIGTERM); nothing is
left half-written. Only this package's exceptions and named OS errors are such failures:
any other exception is a bug and prints its traceback (exit status 1) so it can be reported.
The module imports no torch: ``predict``, ``verify`` and ``tokenize`` run in the runtime
install; ``export``, ``bench`` and ``doctor`` need the ``[export]`` extra.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import errno
import io
import math
import os
import signal
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, NoReturn

from .errors import (
    ArtifactError,
    CheckpointError,
    DynamicShapeAuditError,
    InputSpecError,
    MissingExtraError,
    OutputPathError,
    UpstreamMismatchError,
    WorkerError,
)

__all__ = ["main"]


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``error: <message> (see '<prog> --help')``, exit 2."""

    def error(self, message: str) -> NoReturn:
        print(f"error: {message} (see '{self.prog} --help')", file=sys.stderr)
        raise SystemExit(2)


def _shape(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(v) for v in text.split(","))
    except ValueError:
        sizes = ()
    if len(sizes) not in (2, 3):
        raise argparse.ArgumentTypeError(f"expected B,P or B,P,K (integers), got {text!r}")
    if min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"expected B >= 1 and P >= 1 (and K >= 1), got {text!r}")
    return sizes


def _box(positive: bool) -> Callable[[str], tuple[float, float, float, float, bool]]:
    """An argparse type: ``X0,Y0,X1,Y1`` in pixels, finite, ``X1 > X0``, ``Y1 > Y0``."""

    def parse(text: str) -> tuple[float, float, float, float, bool]:
        try:
            x0, y0, x1, y1 = (float(v) for v in text.split(","))
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected X0,Y0,X1,Y1 (four numbers), got {text!r}") from None
        if not all(math.isfinite(v) for v in (x0, y0, x1, y1)) or x1 <= x0 or y1 <= y0:
            raise argparse.ArgumentTypeError(f"expected finite X0 < X1 and Y0 < Y1, got {text!r}")
        return x0, y0, x1, y1, positive

    return parse


def _name_list(text: str) -> list[str]:
    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"expected comma-separated names, got {text!r}")
    return names


def _shape_list(text: str) -> list[tuple[int, int]]:
    shapes = []
    for item in (t.strip() for t in text.split(",")):
        b, sep, p = item.partition("x")
        if not (sep and b.isdigit() and p.isdigit() and int(b) >= 1 and int(p) >= 1):
            raise argparse.ArgumentTypeError(f"expected shapes like 1x1,2x3 (B x P, each >= 1), got {text!r}")
        shapes.append((int(b), int(p)))
    return shapes


def _ranged(parse: Callable[[str], Any], expected: str, ok: Callable[[Any], bool]) -> Callable[[str], Any]:
    """An argparse type: ``parse`` the text, then check it with ``ok``; both failures say
    ``expected`` and what came."""

    def convert(text: str) -> Any:
        try:
            value = parse(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text}")
        return value

    return convert


#: The most intra-op threads a command accepts (the OpenMP runtime crashed far above it).
MAX_THREADS = 1024

_positive_int = _ranged(int, "a positive integer", lambda v: v >= 1)
_threads = _ranged(int, f"an integer in [1, {MAX_THREADS}]", lambda v: 1 <= v <= MAX_THREADS)
_seed = _ranged(int, "an integer in [0, 2**63)", lambda v: 0 <= v < 2**63)
_positive_float = _ranged(float, "a positive number", lambda v: 0 < v < float("inf"))
_non_negative_int = _ranged(int, "an integer >= 0", lambda v: v >= 0)
_port = _ranged(int, "a port in [1, 65535]", lambda v: 1 <= v <= 65535)
_threshold = _ranged(float, "a number in [0, 1]", lambda v: 0.0 <= v <= 1.0)


def _export_side(command: str) -> Any:
    """The export side (torch, sam3), or :class:`MissingExtraError` naming the extra."""
    import importlib

    try:
        importlib.import_module("torch")
        importlib.import_module("sam3")
        return importlib.import_module("sam3_exportable.export.recipe")
    except ImportError as exc:
        if (
            not isinstance(exc, ModuleNotFoundError)
            or exc.name is None
            or exc.name.startswith("sam3_exportable")
        ):
            raise
        raise MissingExtraError(
            f"{command}: expected {exc.name} to be installed, it is not; "
            "pip install 'sam3-exportable[export]'"
        ) from exc


def _set_torch_threads(threads: int | None) -> None:
    if threads:
        import torch

        torch.set_num_threads(threads)


def export_command(args: argparse.Namespace) -> int:
    recipe = _export_side("export")
    from .progress import Stages
    from .verify import format_parity

    _set_torch_threads(args.threads)
    formats = [args.format] + (["aoti"] if args.aoti else [])
    if args.aoti and args.format != "pt2":
        raise InputSpecError("--aoti: compiles the .pt2 program; use it with --format pt2")
    if args.quantize and args.format != "onnx":
        raise InputSpecError("--quantize: quantizes the ONNX graph; use it with --format onnx")
    if args.verify is not None and len(args.verify) == 3 and not args.boxes:
        raise InputSpecError(f"--verify: expected B,P without --boxes, got {','.join(map(str, args.verify))}")
    stages = Stages.printing()
    record = recipe.build_artifact(
        args.out,
        size=args.size,
        checkpoint=args.checkpoint,
        seed=args.seed,
        allow_missing_keys=args.allow_missing_keys,
        formats=formats,
        autocast=args.autocast,
        verify=args.verify,
        force=args.force,
        quantize=args.quantize,
        stages=stages,
        boxes=args.boxes,
        staged=args.stages,
    )
    for kind, parity in record.parity.items():
        for line in format_parity(parity, "" if kind == "pt2" else kind):
            print(f"  {line}")
        verdict = record.verdict(kind)
        if kind in ("pt2", "pt2-stages"):
            what = "ground(encode_images(x))" if kind == "pt2-stages" else "exported"
            same = "== eager, bitwise" if verdict else "differs from eager"
            print(f"  verify: {what} {same}")
        elif verdict is None:
            print(f"  verify: {kind} is approximate by design: reported above, not checked")
        else:
            print(f"  verify: {kind} keeps the same instances as eager: {verdict}")
    print(stages.summary())
    return 0 if record.verified else 1


def predict_command(args: argparse.Namespace) -> int:
    from .artifact.manifest import read_manifest
    from .batch.api import segment_images
    from .batch.store import OVERLAYS_DIR

    manifest = read_manifest(args.model)  # the one read of the run: passed down
    if manifest.model.random_weights:
        print("  NOTE: this artifact has random weights: its masks are meaningless", flush=True)
    elif manifest.model.missing_keys:
        print(
            f"  NOTE: {manifest.model.missing_keys} tensors of this artifact kept their random "
            "initialisation (exported with --allow-missing-keys): its masks may be meaningless",
            flush=True,
        )
    phrases: list[str | None] = list(args.prompt or [])
    boxes: Any = None
    if args.box_file and args.box:
        raise InputSpecError("--boxes: expected either --boxes FILE or --box/--negative-box, got both")
    if args.box:
        boxes = list(args.box)
    elif args.box_file:
        from .batch.inputs import read_box_file

        boxes = read_box_file(args.box_file, max(1, len(phrases)))
    if boxes is not None and not phrases:
        phrases = [None]  # boxes alone
    summary = segment_images(
        args.image or [],
        phrases,
        artifact=args.model,
        manifest=manifest,
        out=args.out,
        image_lists=args.image_list or [],
        engine=args.engine,
        batch_size=args.batch_size,
        max_pairs=args.max_pairs,
        threshold=args.threshold,
        workers=args.workers,
        threads=args.threads,
        ray_address=args.ray_address,
        resume=args.resume,
        force=args.force,
        retry_failed=args.retry_failed,
        overlay=not args.no_overlay,
        masks=not args.no_masks,
        strict=args.strict,
        max_pixels=args.max_pixels,
        boxes=boxes,
    )
    failed = f", {summary.failed} failed" if summary.failed else ""
    before = f", {summary.skipped} done before" if summary.skipped else ""
    print(
        f"segmented {summary.segmented} of {summary.images} images{failed} in {summary.seconds:.1f} s "
        f"(this run: {summary.written} images{before}; {summary.engine} engine, {summary.workers} "
        f"worker(s) x {summary.threads} thread(s))"
    )
    print(f"results: {summary.results_jsonl}")
    print(f"coco: {summary.coco_json}")
    if not args.no_overlay:
        print(f"overlays: {summary.out / OVERLAYS_DIR}")
    if summary.failed:
        print(
            f"error: {summary.failed} of {summary.images} images failed; see {summary.errors_jsonl}",
            file=sys.stderr,
        )
        return 1
    return 0


def verify_command(args: argparse.Namespace) -> int:
    from .predict.compare import compare_artifacts
    from .tokenizer import validate_phrases
    from .verify import format_parity, kept_label

    phrases = validate_phrases(args.prompt or [])
    report = compare_artifacts(
        args.reference,
        args.candidate,
        args.image,
        phrases,
        threshold=args.threshold,
        max_pixels=args.max_pixels,
        threads=args.threads,
    )
    kinds = f"{report['reference_kind']} vs {report['candidate_kind']}"
    shape = f"{report['images']} image(s) x {len(phrases)} phrase(s)"
    print(f"{args.candidate} against {args.reference} ({kinds}), {shape}")
    for line in format_parity(report["parity"]):
        print(f"  {line}")
    kept = report["kept"]
    iou = (
        f"their mask IoU: mean {kept['mean_iou']:.4f}, min {kept['min_iou']:.4f}"
        if kept["both"]
        else "no mask IoU: no instance kept by both"
    )
    print(
        f"  kept at {args.threshold:g}: {kept['reference']} by the reference, {kept['candidate']} by the "
        f"candidate, {kept['both']} by both ({iou})"
    )
    same = report["parity"][kept_label(args.threshold)]["identical"]  # decided at the threshold asked
    print(f"verify: the candidate keeps the same instances as the reference at {args.threshold:g}: {same}")
    return 0 if same else 1


def tokenize_command(args: argparse.Namespace) -> int:
    import json

    from .predict.predictor import make_prompts
    from .tokenizer import Tokenizer

    if args.context_length < 3:
        raise InputSpecError(
            f"--context-length: expected at least 3 (start, a token, end), got {args.context_length}"
        )
    ids = make_prompts(Tokenizer(args.context_length), args.prompt or []).token_ids  # warns when cut
    print(json.dumps({"context_length": args.context_length, "token_ids": ids.tolist()}))
    return 0


def bench_command(args: argparse.Namespace) -> int:
    import time

    _export_side("bench")
    from .bench.plan import narrowed, plan_for
    from .bench.report import format_measured, verdict
    from .bench.run import run_bench

    plan = plan_for(
        args.size,
        args.quick,
        scaling_budget_s=args.scaling_budget,
        all_shapes=args.all_shapes,
        malloc=args.malloc,
    )
    plan = narrowed(plan, variants=args.variants, shapes=args.shapes, runs=args.runs, skip=args.skip or ())
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
        print(f"  {t['name']:62s} {t['target']:>7s}  {measured:>14s}  {verdict(t)}")
    failed = [k for k, v in doc["jobs"].items() if isinstance(v, dict) and "error" in v]
    if failed:
        print(f"\n{len(failed)} job(s) failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def serve_command(args: argparse.Namespace) -> int:
    from .artifact.base import default_threads
    from .serve.options import ServeOptions, read_api_key
    from .serve.server import serve_artifact

    named = {f.name for f in dataclasses.fields(ServeOptions)} - {"model", "threads", "api_key_sha256"}
    options = ServeOptions(
        model=str(args.model),
        threads=args.threads or max(1, default_threads() // args.replicas),
        api_key_sha256=read_api_key(args.api_key_file) if args.api_key_file else None,
        **{name: getattr(args, name) for name in named},
    )
    try:
        serve_artifact(options, ray_address=args.ray_address, say=lambda text: print(text, flush=True))
    except _Terminated:
        print("stopped (SIGTERM): the requests in flight were answered", file=sys.stderr)
    return 0


def doctor_command(args: argparse.Namespace) -> int:
    _export_side("doctor")
    from .patching.doctor import doctor_rows, format_table

    rows = doctor_rows()
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
    from .batch.api import DEFAULT_BATCH_SIZE, DEFAULT_MAX_PAIRS
    from .predict.images import DEFAULT_MAX_PIXELS
    from .serve.options import ServeOptions

    served = {f.name: f.default for f in dataclasses.fields(ServeOptions)}  # one owner of the defaults

    parser = _Parser(
        prog="sam3-exportable",
        description="Export SAM3's text-grounding pipeline as one artifact and run it.",
    )
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    exp = sub.add_parser("export", help="build, export, audit and save an artifact")
    weights = exp.add_mutually_exclusive_group(required=True)
    weights.add_argument(
        "--checkpoint", help="upstream-format SAM3 checkpoint: a file, or hf://facebook/sam3 (the hub)"
    )
    weights.add_argument(
        "--random-weights",
        action="store_true",
        help="deterministic random weights (masks are meaningless; for testing the pipeline)",
    )
    exp.add_argument(
        "--allow-missing-keys",
        action="store_true",
        help="export a checkpoint that lacks some tensors (they stay random; the manifest says how many)",
    )
    exp.add_argument("--size", choices=["full", "tiny"], default="full")
    exp.add_argument("--seed", type=_seed, default=0, help="seed for --random-weights")
    exp.add_argument("--out", required=True, help="path of the artifact to write (e.g. build/sam3.pt2)")
    exp.add_argument("--format", choices=["pt2", "onnx"], default="pt2", help="artifact kind (default pt2)")
    exp.add_argument("--autocast", choices=["none", "bf16", "fp16"], default="none")
    exp.add_argument(
        "--verify",
        type=_shape,
        metavar="B,P[,K]",
        help="compare each artifact with eager at B images, P phrases (and K box slots with --boxes)",
    )
    exp.add_argument(
        "--boxes",
        action="store_true",
        help="export the box-capable graph: exemplar boxes (boxes, box_labels, box_valid) as "
        "inputs besides the phrases, K boxes per pair dynamic",
    )
    exp.add_argument(
        "--stages",
        action="store_true",
        help="also write the graph's two stages into the .pt2 (encode_images, ground; weights "
        "stored once): a Predictor then encodes an image once for all its prompts",
    )
    exp.add_argument(
        "--aoti",
        action="store_true",
        help="also compile an AOTInductor package <out>.aoti.pt2 from the same program (minutes)",
    )
    exp.add_argument(
        "--quantize",
        choices=["int8"],
        help="with --format onnx: also write <stem>.int8.onnx, onnxruntime's dynamic int8 "
        "quantization of the MatMul/Gemm weights (validate it on your images: see 'verify')",
    )
    exp.add_argument("--force", action="store_true", help="overwrite an existing --out")
    exp.add_argument("--threads", type=_threads, help="torch threads (default: torch's)")
    _add_malloc_argument(exp)
    exp.set_defaults(func=export_command)

    pred = sub.add_parser(
        "predict",
        help="segment images by text prompts and/or exemplar boxes: files, folders, patterns, lists",
        description="Segment images by text prompts and/or exemplar boxes, in batches, writing per "
        "image as it is done "
        "(masks/, overlays/, results.jsonl) and coco.json at the end; --resume continues an "
        "interrupted run. Exit status 0, 1 when some images failed (see errors.jsonl), 2 for a "
        "bad argument.",
    )
    pred.add_argument("--model", required=True, type=Path, help="artifact written by export")
    pred.add_argument(
        "--image",
        action="append",
        help="an image file, a directory (searched recursively) or a glob pattern (quote it); repeatable",
    )
    pred.add_argument(
        "--image-list",
        action="append",
        metavar="FILE",
        help="a file with one image path per line (# comments and blank lines ignored); repeatable",
    )
    pred.add_argument(
        "--prompt", action="append", help="a phrase, e.g. 'a dog'; repeatable (none: boxes alone)"
    )
    pred.add_argument(
        "--box",
        action="append",
        type=_box(True),
        metavar="X0,Y0,X1,Y1",
        help="a positive exemplar box in image pixels, for every phrase of every image; "
        "repeatable (needs an artifact exported with --boxes)",
    )
    pred.add_argument(
        "--negative-box",
        action="append",
        dest="box",
        type=_box(False),
        metavar="X0,Y0,X1,Y1",
        help="a negative exemplar box, as --box; boxes keep the order given",
    )
    pred.add_argument(
        "--boxes",
        dest="box_file",
        metavar="FILE.jsonl",
        help='exemplar boxes per image: one line per image, {"path": ..., "boxes": [[box, ...] per '
        "phrase]}, a box [x0, y0, x1, y1] or [x0, y0, x1, y1, label]; [] or null: none for that phrase",
    )
    pred.add_argument("--threshold", type=_threshold, default=0.5)
    pred.add_argument("--out", required=True, help="output directory")
    again = pred.add_mutually_exclusive_group()
    again.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out (the same job): images already written are skipped",
    )
    again.add_argument("--force", action="store_true", help="replace a previous run in --out")
    pred.add_argument(
        "--retry-failed", action="store_true", help="with --resume: run the images that failed again"
    )
    pred.add_argument("--strict", action="store_true", help="stop at the first bad image (exit status 2)")
    pred.add_argument("--no-masks", action="store_true", help="write no instance-label PNGs")
    pred.add_argument("--no-overlay", action="store_true", help="write no overlay PNGs")
    pred.add_argument(
        "--batch-size",
        type=_positive_int,
        default=DEFAULT_BATCH_SIZE,
        help=f"images per graph call (default {DEFAULT_BATCH_SIZE}: on CPU a batch of B costs about "
        "B single calls, so larger batches only add memory; they pay on accelerators)",
    )
    pred.add_argument(
        "--max-pairs",
        type=_positive_int,
        default=DEFAULT_MAX_PAIRS,
        help=f"most image-phrase pairs per graph call; more phrases run in chunks (default "
        f"{DEFAULT_MAX_PAIRS}: the full-size model then stays under 8 GiB however many phrases; "
        "raise it to go faster when memory allows)",
    )
    pred.add_argument("--engine", choices=["local", "ray"], default="local", help="where batches run")
    pred.add_argument(
        "--workers",
        type=_positive_int,
        help="--engine ray: worker processes (default: CPUs / --threads, at most one per batch)",
    )
    pred.add_argument(
        "--threads",
        type=_threads,
        help=f"threads per worker, at most {MAX_THREADS} (default: the usable CPUs for local, 1 for "
        "ray); results are bitwise the same across engines and workers at the same --threads",
    )
    pred.add_argument(
        "--ray-address",
        metavar="ADDR",
        help="--engine ray: an existing cluster (host:port) instead of a new one",
    )
    pred.add_argument(
        "--max-pixels",
        type=_positive_int,
        default=DEFAULT_MAX_PIXELS,
        help=f"refuse images with more pixels (default {DEFAULT_MAX_PIXELS:,}; "
        "guards against decompression bombs)",
    )
    _add_malloc_argument(pred)
    pred.set_defaults(func=predict_command)

    bench = sub.add_parser("bench", help="measure export, load, latency, memory and FLOP/s")
    bench.add_argument("--size", choices=["full", "tiny"], default="full")
    bench.add_argument("--quick", action="store_true", help="tiny only: a couple of minutes")
    bench.add_argument("--out", default="bench", help="directory for results.json and plots")
    bench.add_argument("--work-dir", help="where the bench's artifacts go (default OUT/work)")
    bench.add_argument(
        "--scaling-budget", type=_positive_float, help="seconds for full-size scaling points (default 600)"
    )
    bench.add_argument(
        "--all-shapes", action="store_true", help="full size: every variant at every shape (much longer)"
    )
    bench.add_argument(
        "--variants",
        type=_name_list,
        help="comma-separated variants to time (default all of the preset: eager, exported, aoti, "
        "bf16, onnx, onnx-int8)",
    )
    bench.add_argument(
        "--shapes", type=_shape_list, help="comma-separated BxP shapes to keep of the preset, e.g. 1x1,2x3"
    )
    bench.add_argument("--runs", type=_positive_int, help="timed runs per latency job (default 3)")
    bench.add_argument(
        "--skip",
        type=_name_list,
        help="comma-separated sections to leave out: loads, allocator, scaling, profiles, throughput, "
        "boxes, stages, serve",
    )
    again_bench = bench.add_mutually_exclusive_group()
    again_bench.add_argument("--resume", action="store_true", help="continue OUT/results.json")
    again_bench.add_argument("--force", action="store_true", help="start over, replacing OUT/results.json")
    _add_malloc_argument(bench, "of every job's process; eager at (1,1) also runs under 'default'")
    bench.set_defaults(func=bench_command)

    ver = sub.add_parser("verify", help="compare two artifacts (e.g. int8 vs fp32) on your images")
    ver.add_argument(
        "--reference", required=True, type=Path, help="the artifact to trust (e.g. the fp32 one)"
    )
    ver.add_argument("--candidate", required=True, type=Path, help="the artifact to check (e.g. int8)")
    ver.add_argument("--image", required=True, action="append", type=Path, help="repeatable")
    ver.add_argument("--prompt", action="append", help="a phrase, e.g. 'a dog'; repeatable")
    ver.add_argument("--threshold", type=_threshold, default=0.5)
    ver.add_argument("--max-pixels", type=_positive_int, default=DEFAULT_MAX_PIXELS)
    ver.add_argument("--threads", type=_threads, help="threads of both runtimes (default: the usable CPUs)")
    ver.set_defaults(func=verify_command)

    tok = sub.add_parser(
        "tokenize", help="print upstream's token ids of phrases as JSON (for other runtimes)"
    )
    tok.add_argument("--prompt", action="append", help="a phrase, e.g. 'a dog'; repeatable")
    tok.add_argument("--context-length", type=_positive_int, default=32, help="the artifact's (manifest)")
    tok.set_defaults(func=tokenize_command)

    srv = sub.add_parser(
        "serve",
        help="serve an artifact over HTTP on Ray Serve, batching concurrent requests",
        description="Serve an artifact (any kind) at POST /v1/segment on Ray Serve (a local Ray "
        "instance, or --ray-address's cluster), packing concurrent requests into shared graph "
        "calls; GET /healthz, /readyz, /v1/model; OpenAPI at /docs. Runs until SIGTERM or "
        "Ctrl-C, which answer the requests in flight first.",
    )
    srv.add_argument("--model", required=True, type=Path, help="artifact written by export")
    srv.add_argument(
        "--host", default=served["host"], help=f"address to listen on (default {served['host']})"
    )
    srv.add_argument("--port", type=_port, default=served["port"], help=f"port (default {served['port']})")
    srv.add_argument(
        "--replicas", type=_positive_int, default=served["replicas"], help="replicas (processes), default 1"
    )
    srv.add_argument(
        "--threads",
        type=_threads,
        help="intra-op threads per replica (default: the usable CPUs / --replicas); answers equal "
        "predict's at the same --threads",
    )
    srv.add_argument(
        "--max-batch-size",
        type=_positive_int,
        default=served["max_batch_size"],
        help=f"most requests per batch (default {served['max_batch_size']})",
    )
    srv.add_argument(
        "--batch-wait-ms",
        type=_ranged(float, "a number in [0, 60000]", lambda v: 0 <= v <= 60000),
        default=served["batch_wait_ms"],
        help=f"longest wait for company a lone request gets (default {served['batch_wait_ms']:g} ms)",
    )
    srv.add_argument(
        "--max-pairs",
        type=_positive_int,
        default=served["max_pairs"],
        help=f"most image-phrase pairs per graph call, as predict's (default {served['max_pairs']})",
    )
    srv.add_argument(
        "--max-queued",
        type=_non_negative_int,
        default=served["max_queued"],
        help="requests waiting in a replica past which a new one gets 503 with Retry-After "
        f"(default {served['max_queued']})",
    )
    srv.add_argument(
        "--max-body-bytes",
        type=_positive_int,
        default=served["max_body_bytes"],
        help=f"largest request body; 413 above (default {served['max_body_bytes']:,})",
    )
    srv.add_argument(
        "--max-pixels",
        type=_positive_int,
        default=served["max_pixels"],
        help=f"largest image in pixels; 422 above (default {served['max_pixels']:,})",
    )
    for name, what in (("max_prompts", "prompts"), ("max_boxes", "boxes")):
        flag, default = "--" + name.replace("_", "-"), served[name]
        srv.add_argument(
            flag, type=_positive_int, default=default, help=f"{what} per request (default {default})"
        )
    srv.add_argument(
        "--cache-bytes",
        type=_non_negative_int,
        default=served["cache_bytes"],
        help=f"image-feature cache of a staged artifact per replica (default {served['cache_bytes']:,}; "
        "0: none): a follow-up request on a cached image skips the image encoder",
    )
    srv.add_argument(
        "--ray-address", metavar="ADDR", help="deploy onto this Ray cluster instead of a local one"
    )
    srv.add_argument(
        "--api-key-file",
        metavar="FILE",
        help="every /v1 request must send 'Authorization: Bearer <the key on this file's first line>'",
    )
    _add_malloc_argument(srv, "of every replica, applied before it loads the artifact")
    srv.set_defaults(func=serve_command)

    doc = sub.add_parser("doctor", help="report each patch for the installed torch and sam3")
    doc.set_defaults(func=doctor_command)
    return parser


#: This package's exceptions (each message names the input, what was expected and what came)
#: and the OS errors of a named path; everything else is a bug and shows its traceback.
_EXPECTED_ERRORS = (
    ArtifactError,
    CheckpointError,
    DynamicShapeAuditError,
    FileExistsError,
    FileNotFoundError,
    MissingExtraError,
    InputSpecError,
    OutputPathError,
    UpstreamMismatchError,
    WorkerError,
)

#: errno values of OSErrors a user's environment causes (disk full, read-only, permissions)
_USER_ERRNOS = {
    errno.ENOSPC,
    errno.EROFS,
    errno.EACCES,
    errno.EPERM,
    errno.EDQUOT,
    errno.EBUSY,
    errno.ENOTDIR,
    errno.EISDIR,
}


class _ClosedPipeSafe:
    """A text stream that stops writing, silently, once its reader has gone (``| head``):
    the command finishes its work (every output file, ``coco.json``) instead of dying with
    ``BrokenPipeError``, and exits with its own status."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream
        self.gone = False

    def _closed(self) -> None:
        self.gone = True
        try:  # the interpreter's final flush must not raise either
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, self._stream.fileno())
            os.close(devnull)
        except (OSError, ValueError, AttributeError, io.UnsupportedOperation):
            pass

    def write(self, text: str) -> int:
        if not self.gone:
            try:
                self._stream.write(text)
            except BrokenPipeError:
                self._closed()
        return len(text)

    def flush(self) -> None:
        if not self.gone:
            try:
                self._stream.flush()
            except BrokenPipeError:
                self._closed()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


@contextlib.contextmanager
def _closed_pipes_tolerated() -> Iterator[None]:
    saved = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = _ClosedPipeSafe(sys.stdout), _ClosedPipeSafe(sys.stderr)  # type: ignore[assignment]
    try:
        yield
    finally:
        for wrapper in (sys.stdout, sys.stderr):
            if isinstance(wrapper, _ClosedPipeSafe):
                wrapper.flush()
        sys.stdout, sys.stderr = saved


class _Terminated(BaseException):
    """Raised in the main thread by the SIGTERM handler, so cleanup runs as for Ctrl-C."""


def _on_sigterm(signum: int, frame: Any) -> None:
    raise _Terminated


def _is_out_of_memory(exc: BaseException) -> bool:
    return isinstance(exc, MemoryError) or (isinstance(exc, RuntimeError) and "not enough memory" in str(exc))


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``sam3-exportable`` console script; returns the exit status."""
    import logging
    import warnings

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    warnings.filterwarnings("ignore", module=r"sam3\..*")
    warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*")
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    args.argv = argv
    if getattr(args, "malloc", None) and args.func is not bench_command:
        from .allocator import apply_malloc_policy

        apply_malloc_policy(args.malloc)  # bench applies it in each job's own process
    func: Callable[[argparse.Namespace], int] = args.func
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if _in_main_thread() else None
    shown = warnings.showwarning
    warnings.showwarning = _one_line_warning
    try:
        with _closed_pipes_tolerated():
            return _run(func, args)
    finally:
        warnings.showwarning = shown
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _run(func: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """``func(args)``, with the failures a user can cause turned into one line and status 2."""
    try:
        return func(args)
    except _EXPECTED_ERRORS as exc:
        print(f"error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except OSError as exc:
        if exc.errno not in _USER_ERRNOS:
            raise
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"error: {where}{exc.strerror or exc}", file=sys.stderr)
        return 2
    except (MemoryError, RuntimeError) as exc:
        if not _is_out_of_memory(exc):
            raise
        print(
            f"error: out of memory: {_one_line(exc)}; try fewer images or phrases per call", file=sys.stderr
        )
        return 2
    except KeyboardInterrupt:
        print("interrupted (Ctrl-C): nothing half-written was left behind", file=sys.stderr)
        return 130
    except _Terminated:
        print("terminated (SIGTERM): nothing half-written was left behind", file=sys.stderr)
        return 143


def _one_line_warning(message: Warning | str, category: type[Warning], *args: Any, **kwargs: Any) -> None:
    """Warnings as one line on stderr (``warning: ...``), without the source line."""
    print(f"warning: {_one_line(message) if isinstance(message, Warning) else message}", file=sys.stderr)


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return " ".join(text.split())


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
