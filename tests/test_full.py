"""Full-size (840M parameters) tier: one export per session, parity, fresh-process load, the
ONNX graph in an onnxruntime-only process, the memory of a batch job with many phrases."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import (
    assert_bitwise,
    eager,
    example_inputs,
    run_cli,
    run_in_fresh_process,
    run_in_onnxruntime_only,
)
from PIL import Image
from pycocotools import mask as mask_utils

import sam3_exportable as s3e
from sam3_exportable.artifact import save_pipeline
from sam3_exportable.batch import DEFAULT_MAX_PAIRS
from sam3_exportable.export import audit_dynamic_shapes, export_full_pipeline, export_stages
from sam3_exportable.predict import Predictor, load_image
from sam3_exportable.verify import compare_parity, exceeded_bounds, format_parity, same_instances

pytestmark = pytest.mark.full

_EAGER: dict[tuple[int, int], tuple[torch.Tensor, ...]] = {}


@pytest.fixture(scope="module")
def full_wrapper() -> s3e.FullSam3PipelineWrapper:
    return s3e.FullSam3PipelineWrapper(s3e.build_model("full", seed=0)).eval()


@pytest.fixture(scope="module")
def full_ep(full_wrapper) -> torch.export.ExportedProgram:
    return export_full_pipeline(full_wrapper.model)


@pytest.fixture(scope="module")
def full_staged_pt2(full_wrapper, full_ep, tmp_path_factory) -> Path:
    """The full program saved with its two stages (``export --stages``), weights stored once."""
    path = tmp_path_factory.mktemp("staged") / "sam3.pt2"
    save_pipeline(full_ep, path, stages=export_stages(full_wrapper.model))
    return path


def _eager(wrapper, batch: int, prompts: int):
    if (batch, prompts) not in _EAGER:
        _EAGER[(batch, prompts)] = eager(wrapper, *example_inputs(wrapper, batch, prompts, seed=21))
    return _EAGER[(batch, prompts)]


def test_full_model_facts(full_wrapper) -> None:
    assert sum(p.numel() for p in full_wrapper.model.parameters()) == 840_509_750
    assert (full_wrapper.image_size, full_wrapper.context_length) == (1008, 32)


def test_full_audit_is_clean(full_ep) -> None:
    report = audit_dynamic_shapes(full_ep)
    assert report.ranges == {"batch": (1, float("inf")), "num_prompts": (1, float("inf"))}


# (1, 1): test_full_save_and_load_in_fresh_process runs the same program, saved and loaded
@pytest.mark.parametrize(("batch", "prompts"), [(2, 2)])
def test_full_exported_equals_eager(full_wrapper, full_ep, batch: int, prompts: int) -> None:
    expected = _eager(full_wrapper, batch, prompts)
    assert [tuple(o.shape) for o in expected] == [
        (batch * prompts, 200, 1),
        (batch * prompts, 200, 4),
        (batch * prompts, 200, 288, 288),
        (batch * prompts, 1),
    ]
    assert_bitwise(expected, full_ep.module()(*example_inputs(full_wrapper, batch, prompts, seed=21)))


def test_full_save_and_load_in_fresh_process(full_wrapper, full_ep, tmp_path: Path) -> None:
    path = tmp_path / "sam3.pt2"
    manifest = save_pipeline(full_ep, path)
    assert manifest.file is not None and manifest.file.size_bytes > 3 * 2**30
    outputs = run_in_fresh_process(path, example_inputs(full_wrapper, 1, 1, seed=21), tmp_path)
    assert_bitwise(_eager(full_wrapper, 1, 1), outputs)


_UPSTREAM: dict[str, Any] = {}


def _grace_hopper():
    import matplotlib.cbook

    return load_image(matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False))


def _upstream_on_grace_hopper(model) -> tuple[Any, dict[str, Any]]:
    """Upstream's ``Sam3Processor`` (threshold 0: random weights keep every query, so the
    comparisons are not vacuous) and a fresh copy of its ``set_image`` state of
    grace_hopper.jpg, the image encoded once per module as upstream's interactive use does."""
    from sam3.model.sam3_image_processor import Sam3Processor

    if not _UPSTREAM:
        with s3e.exportable_sam3():
            processor = Sam3Processor(model, resolution=1008, device="cpu")
            processor.confidence_threshold = 0.0
            _UPSTREAM.update(processor=processor, state=processor.set_image(_grace_hopper()))
    state = dict(_UPSTREAM["state"])
    state["backbone_out"] = {
        k: list(v) if isinstance(v, list) else v for k, v in _UPSTREAM["state"]["backbone_out"].items()
    }
    return _UPSTREAM["processor"], state


def _upstream_text(model, phrase: str) -> dict[str, Any]:
    processor, state = _upstream_on_grace_hopper(model)
    with s3e.exportable_sam3():
        return processor.set_text_prompt(phrase, state)


def _assert_upstream(ours, ref: dict[str, Any]) -> None:
    assert ours.scores.shape == (200,)
    assert torch.equal(ours.scores, ref["scores"])
    assert torch.equal(ours.boxes, ref["boxes"])
    assert torch.equal(ours.masks, ref["masks"])


def test_full_predict_matches_upstream_processor(full_wrapper, full_ep) -> None:
    ours = Predictor(full_ep).predict([_grace_hopper()], ["a person"], threshold=0.0)[0][0]
    _assert_upstream(ours, _upstream_text(full_wrapper.model, "a person"))


def test_full_follow_up_prompt_on_a_cached_image_equals_upstream(full_wrapper, full_staged_pt2) -> None:
    """A labelling tool's questions in turn: the staged artifact's Predictor encodes the image
    for "a person", then answers "a dog" from its cache (the prompt stage alone), each
    bitwise what upstream's processor answers on its own cached image (the speed-up is the
    bench's to measure)."""
    from sam3_exportable.artifact import read_manifest

    manifest = read_manifest(full_staged_pt2)  # three programs, the weights' bytes once
    weights = sum(p.numel() * p.element_size() for p in full_wrapper.model.parameters())
    assert manifest.file is not None and weights < manifest.file.size_bytes <= 1.10 * weights
    assert manifest.stages is not None and manifest.stages.features[0].shape == ("batch", 256, 288, 288)
    print(f"staged artifact {manifest.file.size_bytes / 2**30:.3f} GiB, weights {weights / 2**30:.3f} GiB")
    predictor = Predictor(full_staged_pt2)
    image = _grace_hopper()
    first = predictor.predict([image], ["a person"], threshold=0.0)[0][0]
    follow_up = predictor.predict([image], ["a dog"], threshold=0.0)[0][0]
    assert (predictor.cache.misses, predictor.cache.hits, len(predictor.cache)) == (1, 1, 1)
    _assert_upstream(first, _upstream_text(full_wrapper.model, "a person"))
    _assert_upstream(follow_up, _upstream_text(full_wrapper.model, "a dog"))


def test_full_serve_answers_one_request_as_upstream(full_wrapper, full_staged_pt2, tmp_path: Path) -> None:
    """`sam3-exportable serve` on the staged full-size artifact at this process's threads:
    one request (grace_hopper.jpg, "a person", threshold 0: all 200 queries) answers
    upstream's processor's scores, boxes and masks bitwise; its latency and the replica's
    peak RSS are printed for the closing note."""
    import base64
    import time

    import httpx
    import matplotlib.cbook

    from sam3_exportable.serve.loadtest import served

    jpeg = Path(matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)).read_bytes()
    body = {"image": base64.b64encode(jpeg).decode(), "prompts": ["a person"], "threshold": 0.0}
    args = ["--threads", str(torch.get_num_threads())]
    with served(full_staged_pt2, args, tmp_path / "serve.log", ready_timeout_s=1200) as server:
        started = time.perf_counter()
        answer = httpx.post(f"{server.url}/v1/segment", json=body, timeout=1800)
        latency = time.perf_counter() - started
        assert answer.status_code == 200, answer.text
        replica = httpx.get(f"{server.url}/v1/model", timeout=60).json()["replica"]
        ready_s = server.ready_s
    got = answer.json()
    (phrase,) = got["phrases"]
    print(
        f"full-size serve: ready {ready_s:.1f} s, one request {latency:.2f} s ({got['timing']}), "
        f"replica peak RSS {replica['peak_rss_bytes'] / 2**30:.2f} GiB, "
        f"stopped {server.stop_s:.1f} s after SIGTERM"
    )
    ref = _upstream_text(full_wrapper.model, "a person")
    instances = phrase["instances"]
    assert len(instances) == ref["scores"].shape[0] == 200
    assert torch.equal(torch.tensor([i["score"] for i in instances]), ref["scores"])
    assert torch.equal(torch.tensor([i["box_xyxy"] for i in instances]), ref["boxes"])
    masks = np.stack([mask_utils.decode(i["rle"]) for i in instances]).astype(bool)
    assert torch.equal(torch.from_numpy(masks), ref["masks"][:, 0])


# -- batch jobs at full size -----------------------------------------------------------------

#: The memory bound of a batch job with the default --max-pairs, however many phrases.
BATCH_PEAK_RSS_BOUND = 8 * 2**30

_PEAK_OF_CHILD = (
    "import resource, subprocess, sys; "
    "status = subprocess.run(sys.argv[1:]).returncode; "
    "print('peak_rss_kib', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); "
    "sys.exit(status)"
)


def test_full_predict_with_32_phrases_stays_under_8_gib(full_staged_pt2, tmp_path: Path) -> None:
    """`predict` over one full-size image x 32 phrases with the default --max-pairs and the
    default malloc policy, on the staged artifact (the image encoded once, 8 calls of the
    prompt stage): the peak RSS of its process stays within the bound."""
    artifact = full_staged_pt2
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i, (height, width) in enumerate([(1008, 1008)]):
        Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    phrases = [f"object number {i}" for i in range(32)]
    out = tmp_path / "out"
    command = [sys.executable, "-m", "sam3_exportable.cli", "predict", "--model", str(artifact)]
    command += ["--image", str(folder), "--out", str(out), *(a for p in phrases for a in ("--prompt", p))]
    run = subprocess.run(
        [sys.executable, "-c", _PEAK_OF_CHILD, *command], capture_output=True, text=True, timeout=3600
    )
    assert run.returncode == 0, run.stderr[-3000:]
    peak = int(run.stdout.split("peak_rss_kib")[-1]) * 1024
    print(f"predict, 1 image x 32 phrases, --max-pairs {DEFAULT_MAX_PAIRS}: peak RSS {peak / 2**30:.2f} GiB")
    assert peak <= BATCH_PEAK_RSS_BOUND
    lines = (out / "results.jsonl").read_text().splitlines()
    assert len(lines) == 1 and all(len(json.loads(line)["phrases"]) == 32 for line in lines)


# -- ONNX at full size -----------------------------------------------------------------------

#: Bounds of the full-size graph against eager (measured on torch 2.14.1, onnxruntime 1.32,
#: CPU, random weights: masks 1.2e-4, logits 8.2e-7, boxes 2.1e-7, presence 1.3e-6).
FULL_ONNX_BOUNDS = {"pred_logits": 1e-5, "pred_boxes": 1e-5, "pred_masks": 1e-3, "presence_logit_dec": 1e-5}


@pytest.fixture(scope="module")
def full_onnx(full_wrapper, tmp_path_factory) -> Path:
    """The full-size graph, exported (optimizer on, as the CLI does) from its own trace."""
    from sam3_exportable.artifact.onnx import export_onnx

    path = tmp_path_factory.mktemp("onnx") / "sam3.onnx"
    export_onnx(export_full_pipeline(full_wrapper.model, target="onnx"), path)
    return path


def test_full_onnx_keeps_named_symbolic_dims(full_onnx) -> None:
    from sam3_exportable.artifact.onnx import audit_onnx

    report = audit_onnx(full_onnx)
    assert report["inputs"] == {"images": ["batch", 3, 1008, 1008], "token_ids": ["num_prompts", 32]}
    assert {dims[0] for dims in report["outputs"].values()} == {"batch*num_prompts"}
    assert report["zero_size_values"] == 0


def test_full_onnx_in_an_onnxruntime_only_process_within_bounds(
    full_wrapper, full_onnx, tmp_path: Path
) -> None:
    """A shape never used at export time (it traces at B = P = 3), run by onnxruntime alone
    (B = P = 1 at full size is the bench's; the tiny tier runs it in CI)."""
    shapes = [(2, 2)]
    inputs = [example_inputs(full_wrapper, b, p, seed=21) for b, p in shapes]
    results = run_in_onnxruntime_only(full_onnx, inputs, tmp_path, timeout=1800)
    for (batch, prompts), got in zip(shapes, results, strict=True):
        parity = compare_parity(_eager(full_wrapper, batch, prompts), got)
        print("\n".join(format_parity(parity, f"({batch},{prompts})")))
        assert [o.shape[0] for o in got] == [batch * prompts] * 4
        assert exceeded_bounds(parity, FULL_ONNX_BOUNDS) == {}, parity["max_abs_diff"]
        assert same_instances(parity), parity
        assert parity["kept_at_top10"]["kept"] == 10 * batch * prompts


# -- exemplar boxes at full size -------------------------------------------------------------


def _cli(args: list[str]) -> None:
    """``sam3-exportable ARGS`` in this process at its thread count, which is kept."""
    threads = torch.get_num_threads()
    try:
        status, _, err = run_cli([*args, "--threads", str(threads), "--malloc", "default"])
    finally:
        torch.set_num_threads(threads)
    assert status == 0, err


@pytest.fixture(scope="module")
def full_box_artifact(tmp_path_factory) -> Path:
    """``export --boxes`` of the full model (random weights, seed 0: the module's model)."""
    out = tmp_path_factory.mktemp("boxes") / "sam3-boxes.pt2"
    _cli(["export", "--size", "full", "--random-weights", "--boxes", "--out", str(out)])
    return out


def test_full_box_export_is_audited_and_bitwise_eager(full_wrapper, full_box_artifact) -> None:
    """(B, P, K) = (1, 1, 2): one positive and one negative box, both valid (traced at K = 3)."""
    from sam3_exportable.artifact import load_artifact, read_manifest

    manifest = read_manifest(full_box_artifact)
    assert manifest.audit is not None and manifest.takes_boxes
    inf = float("inf")
    artifact = load_artifact(full_box_artifact)
    report = audit_dynamic_shapes(artifact.program)
    assert report.ranges == {"batch": (1, inf), "num_prompts": (1, inf), "num_boxes": (1, inf)}
    images, tokens, boxes, labels, valid = example_inputs(full_wrapper, 1, 1, seed=21, boxes=2)
    valid = torch.ones_like(valid)
    assert labels.tolist() == [[[1, 0]]]
    expected = eager(full_wrapper, images, tokens, boxes, labels, valid)
    assert_bitwise(expected, artifact(images, tokens, boxes, labels, valid))
    assert not torch.equal(expected[0], _eager(full_wrapper, 1, 1)[0])  # the boxes count


def test_full_predict_box_equals_upstream_processor(full_wrapper, full_box_artifact, tmp_path: Path) -> None:
    """`predict --box --negative-box` with the box-capable artifact against upstream's
    Sam3Processor (set_image, set_text_prompt, add_geometric_prompt per box), same threads."""
    import matplotlib.cbook

    path = Path(matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False))
    boxes = ["100,50,400,500", "0,400,150,600"]
    out = tmp_path / "out"
    args = ["predict", "--model", str(full_box_artifact), "--image", str(path), "--prompt", "a person"]
    _cli(
        [
            *args,
            "--box",
            boxes[0],
            "--negative-box",
            boxes[1],
            "--out",
            str(out),
            "--threshold",
            "0.0",
            "--no-overlay",
        ]
    )
    (line,) = [json.loads(text) for text in (out / "results.jsonl").read_text().splitlines()]
    (phrase,) = line["phrases"]
    assert [b["positive"] for b in phrase["prompt_boxes"]] == [True, False]
    image = load_image(path)
    assert image.size == (512, 600)
    processor, state = _upstream_on_grace_hopper(full_wrapper.model)
    with s3e.exportable_sam3():
        state = processor.set_text_prompt("a person", state)
        for value, positive in zip(boxes, (True, False), strict=True):
            x0, y0, x1, y1 = (float(v) for v in value.split(","))
            cxcywh = [(x0 + x1) / 2 / 512, (y0 + y1) / 2 / 600, (x1 - x0) / 512, (y1 - y0) / 600]
            state = processor.add_geometric_prompt(cxcywh, positive, state)
    assert len(phrase["instances"]) == 200
    assert [i["score"] for i in phrase["instances"]] == state["scores"].tolist()
    assert [i["box_xyxy"] for i in phrase["instances"]] == state["boxes"].tolist()
    for instance, mask in zip(phrase["instances"], state["masks"], strict=True):
        assert np.array_equal(mask_utils.decode(instance["rle"]), mask[0].numpy().astype(np.uint8))
