"""What one bench invocation measures (:class:`BenchPlan`, :func:`plan_for`) and the names
of its jobs and files, declared once here."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch

__all__ = [
    "ALLOCATOR_BASELINE",
    "AOTI_COMPILE",
    "BOX_ARTIFACT",
    "BOX_EXPORT",
    "GEOMETRY_SHARE",
    "IMPORTS",
    "MATMUL_PEAK",
    "ONNX_EXPORT",
    "ONNX_VARIANTS",
    "PROFILE_LOAD",
    "SECTIONS",
    "VARIANTS",
    "BenchPlan",
    "artifact_name",
    "box_latency_key",
    "export_key",
    "follow_up_key",
    "latency_key",
    "load_key",
    "narrowed",
    "outputs_name",
    "plan_for",
    "profile_key",
    "scaling_key",
    "staged_artifact_name",
    "staged_export_key",
    "throughput_key",
]

Shape = tuple[int, int]

#: Variant -> (artifact it runs, how it is exported). ``eager`` builds the model instead.
VARIANTS: dict[str, dict[str, str] | None] = {
    "eager": None,
    "exported": {"kind": "pt2", "autocast": "none"},
    "aoti": {"kind": "aoti", "autocast": "none"},
    "bf16": {"kind": "pt2", "autocast": "bf16"},
    "onnx": {"kind": "onnx", "autocast": "none"},
    "onnx-int8": {"kind": "onnx-int8", "autocast": "none"},
}
#: Variants that run an ONNX graph (one export job writes both).
ONNX_VARIANTS = ("onnx", "onnx-int8")

# -- job keys: every job's key in results.json["jobs"] comes from one of these ---------------
MATMUL_PEAK = "matmul_peak"
IMPORTS = "imports"
AOTI_COMPILE = "aoti_compile"
PROFILE_LOAD = "profile/load"
ONNX_EXPORT = "export/onnx"
ALLOCATOR_BASELINE = "allocator/eager-default/1x1"


#: the box-capable ``.pt2`` (:mod:`.boxes`): its export job and its file in the work dir
BOX_EXPORT = "export/fp32-boxes"
BOX_ARTIFACT = "sam3-boxes.pt2"
#: eager forwards timing the geometry encoder (:mod:`.boxes`)
GEOMETRY_SHARE = "boxes/geometry"


def box_latency_key(boxes: int | str) -> str:
    """``boxes/K=4`` for a box count, ``boxes/text-only`` or ``boxes/padding`` otherwise."""
    return f"boxes/K={boxes}" if isinstance(boxes, int) else f"boxes/{boxes}"


def staged_export_key(autocast: str) -> str:
    """``export/fp32-staged`` or ``export/bf16-staged``: a staged ``.pt2`` (:mod:`.stages`)."""
    return f"export/{'fp32' if autocast == 'none' else autocast}-staged"


def staged_artifact_name(autocast: str) -> str:
    """File name (in the work dir) of the staged ``.pt2`` of ``autocast``."""
    return "sam3-staged.pt2" if autocast == "none" else f"sam3-{autocast}-staged.pt2"


def follow_up_key(autocast: str) -> str:
    """``stages/fp32`` or ``stages/bf16``: one image's prompts asked in turn (:mod:`.stages`)."""
    return f"stages/{'fp32' if autocast == 'none' else autocast}"


def export_key(autocast: str) -> str:
    """``export/fp32`` or ``export/bf16``."""
    return f"export/{'fp32' if autocast == 'none' else autocast}"


def load_key(how: str, run: int) -> str:
    return f"load/{how}/{run}"


def latency_key(variant: str, b: int, p: int) -> str:
    return f"latency/{variant}/{b}x{p}"


def scaling_key(b: int, p: int) -> str:
    return f"scaling/{b}x{p}"


def profile_key(variant: str, b: int, p: int) -> str:
    return f"profile/{variant}/{b}x{p}"


def throughput_key(engine: str, workers: int, threads: int) -> str:
    """``throughput/local/1x2``: a :mod:`.throughput` job (workers x threads per worker)."""
    return f"throughput/{engine}/{workers}x{threads}"


def outputs_name(variant: str, b: int, p: int, tag: str = "") -> str:
    """File (in the work dir) holding a latency job's last outputs, for parity checks."""
    return f"out-{variant}{tag}-{b}x{p}.pt"


def artifact_name(variant: str) -> str:
    """File name (in the work dir) of the artifact a variant runs."""
    spec = VARIANTS[variant]
    assert spec is not None
    stem = "sam3" if spec["autocast"] == "none" else f"sam3-{spec['autocast']}"
    suffix = {"aoti": ".aoti.pt2", "onnx": ".onnx", "onnx-int8": ".int8.onnx"}
    return stem + suffix.get(spec["kind"], ".pt2")


@dataclasses.dataclass
class BenchPlan:
    """What one bench invocation measures (see :func:`plan_for` for the presets).

    ``matrix`` maps each variant to the (B, P) shapes it runs at; jobs run shape by shape,
    every variant of a shape in a row, so ratios between variants compare neighbouring runs.
    """

    size: str
    quick: bool
    matrix: dict[str, list[Shape]]
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
    inductor_configs: dict[str, Any]
    #: (variant, B, P) of each op-level profile
    profiles: list[tuple[str, int, int]]
    threads: int
    #: Most seconds the bf16 variant may take per configuration; when its forward is
    #: predicted slower (bf16 matmul slower than fp32 on this CPU), it runs once, cold, or
    #: not at all if even one run would exceed this.
    bf16_cap_s: float = 900.0
    seed: int = 0
    #: malloc policy of every job's process (:func:`sam3_exportable.allocator.apply_malloc_policy`);
    #: eager at (1,1) also runs once more under ``"default"`` to measure what it changes.
    malloc: str = "retain"
    #: eager at (1,1) once more under malloc's default settings (see ``malloc``)
    allocator_baseline: bool = True
    #: (engine, workers, threads per worker) of each :mod:`.throughput` job, all with the
    #: same total threads; the images (count, height x width) and phrases they segment
    throughput: list[tuple[str, int, int]] = dataclasses.field(default_factory=list)
    throughput_images: int = 0
    throughput_image_size: tuple[int, int] = (480, 640)
    throughput_phrases: list[str] = dataclasses.field(default_factory=lambda: ["a dog", "a cat"])
    #: exemplar boxes per pair of each box-capable latency job at (1,1) (:mod:`.boxes`);
    #: empty: no box section
    box_counts: list[int] = dataclasses.field(default_factory=list)
    #: autocasts ("none", "bf16") of the staged artifacts of the stages section
    #: (:mod:`.stages`), and how many phrases one image is asked in turn; empty: no section
    stage_autocasts: list[str] = dataclasses.field(default_factory=list)
    follow_up_phrases: int = 8
    #: concurrent HTTP clients of each load test of the serve section (:mod:`.online`), and
    #: the requests each sends (over the throughput section's images); empty: no section
    serve_clients: list[int] = dataclasses.field(default_factory=list)
    serve_requests_per_client: int = 2

    @property
    def variants(self) -> list[str]:
        return list(self.matrix)

    @property
    def shapes(self) -> list[Shape]:
        """Every shape of the matrix, in run order."""
        seen: dict[Shape, None] = {}
        for shapes in self.matrix.values():
            seen.update(dict.fromkeys(shapes))
        return sorted(seen, key=lambda s: (s[0] * s[1], s))

    @property
    def aoti(self) -> bool:
        return "aoti" in self.matrix

    @property
    def onnx(self) -> bool:
        return any(v in self.matrix for v in ONNX_VARIANTS)


def plan_for(
    size: str,
    quick: bool = False,
    *,
    scaling_budget_s: float | None = None,
    all_shapes: bool = False,
    malloc: str = "retain",
) -> BenchPlan:
    """The preset plan for ``size`` (``tiny`` or ``full``).

    ``tiny``: every variant at every shape, one warm-up and three timed runs.
    ``tiny --quick``: no AOTInductor compile (it alone takes minutes), one timed run, a
    shorter scaling series: a couple of minutes, for checking the tool itself.
    ``full``: eager and the exported ``.pt2`` at (1,1), (2,3), (1,8); the exported and the
    bf16 ``.pt2`` at (1,1), (2,1), (4,1) (the per-image cost in B); AOTInductor at (1,1);
    the ONNX graph and its int8 quantization at (1,1) and (2,3) (``all_shapes``: every
    variant at every shape, much longer); one warm-up and three timed runs each. Scaling
    points beyond those are single cold runs of the exported ``.pt2``, taken in order of
    importance (P=32 first: it carries the memory target) while their predicted cost fits
    ``scaling_budget_s`` (default 600 s).

    Exemplar boxes (:mod:`.boxes`): the box-capable ``.pt2`` at (1,1) without boxes and with
    K = 1, 4, 16 boxes per pair (``--quick``: 1, 4) against the text-only one, and the
    geometry encoder's share of an eager forward.

    Stages (:mod:`.stages`): one image asked 8 phrases in turn (``--quick``: 3) with the
    staged fp32 and bf16 ``.pt2`` (``--quick``: fp32), with the feature cache and without.

    Serve (:mod:`.online`): the fp32 ``.pt2`` behind ``sam3-exportable serve`` under 1, 2
    and 4 concurrent clients (``--quick``: 1 and 4), 8 requests each (``--quick`` 4, full
    size 2), over the throughput section's images, against ``predict`` over them.

    Throughput (:mod:`.throughput`): ``segment_images`` over the same images with the local
    engine and with Ray at 1 and 2 workers, at the same total threads: tiny 16 images (4 with
    ``--quick``), full size 4.

    ``malloc`` is the malloc policy of every job (``retain`` or ``default``, see
    :mod:`sam3_exportable.allocator`): all variants run under the same one, so ratios compare
    programs, not allocators.
    """
    from ..allocator import MALLOC_POLICIES
    from ..artifact.aoti import DEFAULT_INDUCTOR_CONFIGS

    if malloc not in MALLOC_POLICIES:
        raise ValueError(f"bench malloc: expected one of {list(MALLOC_POLICIES)}, got {malloc!r}")
    if size not in ("tiny", "full"):
        raise ValueError(f"bench size: expected 'tiny' or 'full', got {size!r}")
    if size == "full" and quick:
        raise ValueError("bench --quick: expected --size tiny (a quick full-size run is not meaningful)")
    main: list[Shape] = [(1, 1), (2, 3), (1, 8)]
    per_image: list[Shape] = [(1, 1), (2, 1), (4, 1)]
    everything = sorted({*main, *per_image}, key=lambda s: (s[0] * s[1], s))
    if quick:
        everything = [(1, 1), (2, 1), (1, 8)]
    if size == "tiny" or all_shapes:
        matrix = {v: list(everything) for v in VARIANTS}
    else:
        matrix = {
            "eager": main,
            "exported": everything,
            "aoti": [(1, 1)],
            "bf16": per_image,
            "onnx": [(1, 1), (2, 3)],
            "onnx-int8": [(1, 1), (2, 3)],
        }
    if quick:
        del matrix["aoti"]
    threads = torch.get_num_threads()
    common: dict[str, Any] = {
        "size": size,
        "quick": quick,
        "matrix": matrix,
        "inductor_configs": dict(DEFAULT_INDUCTOR_CONFIGS),
        "threads": threads,
        "malloc": malloc,
        # the local engine, then Ray at the same total threads: one worker, then two
        "throughput": [("local", 1, threads), ("ray", 1, threads), ("ray", 2, max(1, threads // 2))],
        "box_counts": [1, 4] if quick else [1, 4, 16],
        "stage_autocasts": ["none"] if quick else ["none", "bf16"],
        "follow_up_phrases": 3 if quick else 8,
        "serve_clients": [1, 4] if quick else [1, 2, 4],
        "serve_requests_per_client": 4 if quick else (8 if size == "tiny" else 2),
    }
    if size == "tiny":
        return BenchPlan(
            **common,
            warmup=1,
            runs=1 if quick else 3,
            scaling_prompts=[1, 2, 8] if quick else [1, 2, 4, 8, 16, 32],
            scaling_batches=[1, 2] if quick else [1, 2, 4],
            scaling_warmup=1,
            scaling_runs=1 if quick else 3,
            scaling_budget_s=scaling_budget_s,
            load_runs=1 if quick else 3,
            matmul_n=1024 if quick else 2048,
            matmul_runs=3,
            profiles=[]
            if quick
            else [("exported", 1, 1), ("exported", 2, 1), ("bf16", 1, 1), ("bf16", 2, 1)],
            throughput_images=4 if quick else 16,
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
        profiles=[("exported", 1, 1), ("exported", 2, 1), ("bf16", 1, 1), ("bf16", 2, 1)],
        throughput_images=4,
    )


#: Sections of a plan that :func:`narrowed` can leave out.
SECTIONS = ("loads", "allocator", "scaling", "profiles", "throughput", "boxes", "stages", "serve")


def narrowed(
    plan: BenchPlan,
    *,
    variants: Sequence[str] | None = None,
    shapes: Sequence[Shape] | None = None,
    runs: int | None = None,
    skip: Sequence[str] = (),
) -> BenchPlan:
    """``plan`` restricted to ``variants`` and to ``shapes`` (each variant keeps those of its
    preset shapes), with ``runs`` timed runs per latency job and the ``skip``ped sections of
    :data:`SECTIONS` left out. The fp32 ``.pt2`` is exported whatever the variants (the
    other sections run it). Raises ``ValueError`` naming an unknown variant or section, a
    shape no chosen variant runs at, or an empty result."""
    unknown = [v for v in variants or () if v not in VARIANTS]
    if unknown:
        raise ValueError(f"--variants: expected some of {', '.join(VARIANTS)}, got {', '.join(unknown)}")
    bad = [s for s in skip if s not in SECTIONS]
    if bad:
        raise ValueError(f"--skip: expected some of {', '.join(SECTIONS)}, got {', '.join(bad)}")
    if runs is not None and runs < 1:
        raise ValueError(f"--runs: expected a count >= 1, got {runs}")
    keep = set(variants) if variants else set(plan.matrix)
    wanted = set(shapes) if shapes else None
    matrix = {
        v: [s for s in shapes_ if wanted is None or s in wanted]
        for v, shapes_ in plan.matrix.items()
        if v in keep
    }
    matrix = {v: s for v, s in matrix.items() if s}
    if wanted:
        unused = sorted(wanted - {s for s_ in matrix.values() for s in s_})
        if unused:
            text = ", ".join(f"{b}x{p}" for b, p in unused)
            raise ValueError(f"--shapes: no chosen variant of this plan runs at {text}")
    if not matrix:
        raise ValueError("--variants/--shapes: expected at least one variant and shape to run, got none")
    changes: dict[str, Any] = {"matrix": matrix}
    if runs is not None:
        changes["runs"] = runs
    if "loads" in skip:
        changes["load_runs"] = 0
    if "allocator" in skip:
        changes["allocator_baseline"] = False
    if "scaling" in skip:
        changes.update(scaling_prompts=[], scaling_batches=[])
    if "profiles" in skip:
        changes["profiles"] = []
    else:
        changes["profiles"] = [(v, b, p) for v, b, p in plan.profiles if v in matrix]
    if "throughput" in skip:
        changes.update(throughput=[], throughput_images=0)
    if "boxes" in skip:
        changes["box_counts"] = []
    if "stages" in skip:
        changes["stage_autocasts"] = []
    if "serve" in skip:
        changes["serve_clients"] = []
    return dataclasses.replace(plan, **changes)
