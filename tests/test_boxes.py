"""Exemplar boxes: the box-capable program (text + boxes, boxes alone) against upstream's
``Sam3Processor``, padding, the ONNX kind in an onnxruntime-only process, the audit, refusals."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import eager, run_cli, run_in_onnxruntime_only
from PIL import Image
from sam3.model.sam3_image_processor import Sam3Processor
from torch.export import Dim

import sam3_exportable as s3e
from sam3_exportable.artifact import load_artifact, read_manifest
from sam3_exportable.artifact.pt2 import save_pipeline
from sam3_exportable.batch.inputs import read_box_file
from sam3_exportable.cli import main
from sam3_exportable.contract import check_box_inputs, padding_boxes
from sam3_exportable.errors import DynamicShapeAuditError, InputSpecError
from sam3_exportable.export import export_full_pipeline
from sam3_exportable.export.recipe import artifact_paths
from sam3_exportable.export.trace import audit_dynamic_shapes, example_inputs
from sam3_exportable.predict import Predictor
from sam3_exportable.predict.boxes import ExemplarBox, parse_box

THRESHOLD = 0.2  # random tiny weights score about 0.25: keeps instances on both sides
# Bounds of a batched, padded call against upstream's one-pair calls (as test_predict's):
# measured on the tiny model, torch 2.14.1 CPU, in the README.
SCORE_BOUND = 1e-6
MASK_PROB_BOUND = 1e-5
BOX_BOUND_PX = 1e-3
# The ONNX graph against the .pt2 (the bounds).
ONNX_BOUND, ONNX_MASK_BOUND = 1e-4, 1e-3

#: `export` of the tiny model, leaving this process's malloc as it is.
#: int8 graph against the fp32 ``.pt2``: probabilities (and normalised boxes)
INT8_PROBABILITY_BOUND = 0.05
TINY_EXPORT = ["export", "--size", "tiny", "--random-weights", "--malloc", "default"]

#: (x0, y0, x1, y1[, label]) in the pixels of a 320 x 200 image; the second is negative.
BOXES = [(40, 30, 150, 120), (200, 50, 300, 180, False), (10, 100, 310, 195, 1)]


def _image(seed: int, height: int, width: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def images() -> list[Image.Image]:
    return [_image(0, 200, 320), _image(1, 260, 150)]


@pytest.fixture(scope="module")
def box_pt2(box_ep, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("boxes") / "tiny-boxes.pt2"
    save_pipeline(box_ep, path)
    return path


@pytest.fixture(scope="module")
def predictor(box_pt2) -> Predictor:
    return Predictor(box_pt2)


def _upstream(model, image: Image.Image, phrase: str | None, boxes) -> dict:
    """Upstream's processor: set_image, set_text_prompt (when a phrase), then one
    add_geometric_prompt per box, exactly as a user of upstream calls it."""
    with s3e.exportable_sam3():
        processor = Sam3Processor(model, resolution=224, device="cpu", confidence_threshold=THRESHOLD)
        state = processor.set_image(image)
        if phrase is not None:
            state = processor.set_text_prompt(phrase, state)
        for value in boxes:
            box = parse_box(value, image.width, image.height, "box")
            state = processor.add_geometric_prompt(
                list(box.normalized_cxcywh(*image.size)), box.positive, state
            )
        return state


def _assert_same(ours, ref) -> None:
    assert torch.equal(ours.scores, ref["scores"])
    assert torch.equal(ours.boxes, ref["boxes"])
    assert torch.equal(ours.masks_logits, ref["masks_logits"])
    assert torch.equal(ours.masks, ref["masks"])


def test_text_and_boxes_are_bitwise_upstream(tiny_model, predictor, images) -> None:
    image = images[0]
    kept = 0
    for k in (1, 2, 3):  # the second box is negative
        ours = predictor.predict([image], ["a dog"], THRESHOLD, boxes=[[BOXES[:k]]])[0][0]
        _assert_same(ours, _upstream(tiny_model, image, "a dog", BOXES[:k]))
        kept += len(ours.scores)
    assert kept > 0


def test_boxes_alone_are_bitwise_upstream(tiny_model, predictor, images) -> None:
    image = images[0]
    for k in (1, 3):
        ours = predictor.predict([image], [None], THRESHOLD, boxes=[[BOXES[:k]]])[0][0]
        _assert_same(ours, _upstream(tiny_model, image, None, BOXES[:k]))


def test_batched_pairs_with_padding_stay_within_bounds(tiny_model, predictor, images) -> None:
    """2 images x 2 phrases, a different K per pair (0 to 3: padding to K = 3), against each
    pair alone in upstream's processor (a pair with no box: its phrase alone)."""
    phrases = ["a dog", "a red car"]
    portrait = [(10, 20, 120, 200), (30, 150, 140, 250, 0)]
    pair_boxes = [[BOXES[:1], BOXES], [[], portrait]]
    results = predictor.predict(images, phrases, THRESHOLD, boxes=pair_boxes)
    worst = {"score": 0.0, "box": 0.0, "prob": 0.0}
    for i, image in enumerate(images):
        for j, phrase in enumerate(phrases):
            ours, ref = results[i][j], _upstream(tiny_model, image, phrase, pair_boxes[i][j])
            assert ours.scores.shape == ref["scores"].shape, (i, j)
            if not len(ours.scores):
                continue
            worst["score"] = max(worst["score"], float((ours.scores - ref["scores"]).abs().max()))
            worst["box"] = max(worst["box"], float((ours.boxes - ref["boxes"]).abs().max()))
            worst["prob"] = max(worst["prob"], float((ours.masks_logits - ref["masks_logits"]).abs().max()))
            flips = ours.masks != ref["masks"]
            assert ((ref["masks_logits"][flips] - 0.5).abs() <= MASK_PROB_BOUND).all()
    print("batched, padded vs upstream one pair, max |diff|:", worst)
    assert worst["score"] <= SCORE_BOUND and worst["box"] <= BOX_BOUND_PX and worst["prob"] <= MASK_PROB_BOUND


def test_all_padding_is_the_phrase_alone_within_bounds(tiny_model, predictor, images) -> None:
    """No box (the artifact pads one slot) against upstream's text-only processor: the kept
    instances are identical; the numbers differ in the last bits (README)."""
    for image in images:
        ours = predictor.predict([image], ["a dog"], THRESHOLD)[0][0]
        ref = _upstream(tiny_model, image, "a dog", [])
        assert ours.scores.shape == ref["scores"].shape
        if len(ours.scores):
            assert float((ours.scores - ref["scores"]).abs().max()) <= SCORE_BOUND
            assert float((ours.masks_logits - ref["masks_logits"]).abs().max()) <= MASK_PROB_BOUND


def test_the_program_is_bitwise_eager_at_unseen_shapes_and_valid_anywhere(box_ep, tiny_wrapper) -> None:
    report = audit_dynamic_shapes(box_ep)
    assert set(report.ranges) == {"batch", "num_prompts", "num_boxes"}
    assert all(r == (1, float("inf")) for r in report.ranges.values())
    module = box_ep.module()
    for batch, prompts, boxes in ((1, 1, 1), (2, 1, 4), (1, 4, 2), (4, 2, 5)):
        inputs = example_inputs(tiny_wrapper, batch, prompts, seed=11, boxes=boxes)
        with s3e.exportable_sam3(), torch.no_grad():
            expected = tiny_wrapper(*inputs)
        got = module(*inputs)
        assert all(torch.equal(a, b) for a, b in zip(expected, got, strict=True)), (batch, prompts, boxes)
    # valid boxes anywhere along K: the graph moves them to the front, in order, exactly
    images, tokens, coords, labels, _ = example_inputs(tiny_wrapper, 1, 1, seed=12, boxes=3)
    front = module(images, tokens, coords, labels, torch.tensor([[[True, True, False]]]))
    moved = coords[:, :, [2, 0, 1]], labels[:, :, [2, 0, 1]]
    spread = module(images, tokens, *moved, torch.tensor([[[False, True, True]]]))
    garbage = coords.clone()
    garbage[0, 0, 2] = torch.tensor([7.0, -3.0, 50.0, 0.0])  # a padding slot's values do not matter
    padded = module(images, tokens, garbage, labels, torch.tensor([[[True, True, False]]]))
    for a, b, c in zip(front, spread, padded, strict=True):
        assert torch.equal(a, b) and torch.equal(a, c)


def test_the_audit_catches_a_guard_that_specializes() -> None:
    class Specializes(torch.nn.Module):
        def forward(self, images, token_ids, boxes):  # reshape to B * P from other inputs: P != 1
            return boxes.reshape(images.shape[0] * token_ids.shape[0], -1).sum(0) + 0

    batch, prompts = Dim("batch", min=1), Dim("num_prompts", min=1)
    ep = torch.export.export(
        Specializes(),
        (torch.ones(3, 2), torch.ones(3, 2), torch.ones(3, 3, 4)),
        dynamic_shapes=({0: batch}, {0: prompts}, {0: batch, 1: prompts}),
        strict=False,
    )
    with pytest.raises(DynamicShapeAuditError, match=r"input guard .* rejects"):
        audit_dynamic_shapes(
            ep, ((0, 0, "batch"), (1, 0, "num_prompts"), (2, 0, "batch"), (2, 1, "num_prompts"))
        )


def test_the_onnx_kind_runs_with_onnxruntime_only_and_matches_the_pt2(
    box_pt2, box_onnx_pair, tiny_wrapper, tmp_path
) -> None:
    out, int8 = box_onnx_pair
    manifest = read_manifest(out)
    assert [s.name for s in manifest.inputs][2:] == ["boxes", "box_labels", "box_valid"]
    batch, prompts = manifest.inputs[0].shape[0], manifest.inputs[1].shape[0]
    assert all(spec.shape[:2] == (batch, prompts) for spec in manifest.inputs[2:])
    assert isinstance(manifest.inputs[2].shape[2], str) and manifest.inputs[2].shape[2] not in (
        batch,
        prompts,
    )
    assert read_manifest(int8).inputs == manifest.inputs and load_artifact(int8).takes_boxes
    shapes = [(1, 1, 1), (2, 3, 4)]  # traced at 3 x 3 x 3
    inputs = [example_inputs(tiny_wrapper, b, p, seed=13, boxes=k) for b, p, k in shapes]
    padded = [(*x[:2], *padding_boxes(x[0].shape[0], x[1].shape[0], x[0])) for x in inputs]
    got = run_in_onnxruntime_only(out, inputs, tmp_path, timeout=300)
    got_int8 = run_in_onnxruntime_only(int8, [*inputs, *padded], tmp_path, timeout=300)
    reference = load_artifact(box_pt2)
    for shape, x, onnx_out, int8_out in zip(shapes, inputs, got, got_int8[:2], strict=True):
        with torch.inference_mode():
            expected = reference(*x)
        for name, a, b in zip(("logits", "boxes", "masks", "presence"), expected, onnx_out, strict=True):
            bound = ONNX_MASK_BOUND if name == "masks" else ONNX_BOUND
            assert float((a - b).abs().max()) <= bound, (shape, name)
        assert [tuple(o.shape) for o in int8_out] == [tuple(o.shape) for o in expected], shape
        # int8 weights: probabilities within 0.05 (measured 1.4e-3 logits, 9.0e-3 masks,
        # 4.1e-3 presence, boxes 6e-8 on the tiny model)
        for name, a, b in zip(("logits", "boxes", "masks", "presence"), expected, int8_out, strict=True):
            a, b = (a, b) if name == "boxes" else (a.sigmoid(), b.sigmoid())
            assert float((a - b).abs().max()) <= INT8_PROBABILITY_BOUND, (shape, name)
    for with_boxes, without in zip(got_int8[:2], got_int8[2:], strict=True):
        assert not torch.equal(with_boxes[0], without[0])  # the int8 graph reads the boxes


#: AOTInductor against eager (its text-only bounds, tests/test_aoti.py): inductor fuses and
#: reorders float ops (measured with boxes: logits 2.5e-7, masks 2.2e-6, presence 5.4e-7)
AOTI_BOUNDS = {"pred_logits": 1e-5, "pred_boxes": 1e-5, "pred_masks": 1e-4, "presence_logit_dec": 1e-5}


def test_the_aoti_kind_takes_boxes_within_its_bounds(box_pt2, tiny_wrapper, tmp_path) -> None:
    from sam3_exportable.artifact.aoti import compile_aoti
    from sam3_exportable.verify import compare_parity

    source = load_artifact(box_pt2)
    manifest = compile_aoti(source.program, tmp_path / "b.aoti.pt2", source_manifest=source.manifest)
    assert [s.name for s in manifest.inputs] == [s.name for s in source.manifest.inputs]
    package = load_artifact(tmp_path / "b.aoti.pt2")
    assert package.kind == "aoti" and package.takes_boxes
    for b, p, k in [(2, 1, 3), (1, 2, 1)]:  # traced at 3 x 3 x 3
        inputs = example_inputs(tiny_wrapper, b, p, seed=17, boxes=k)
        with torch.inference_mode():
            parity = compare_parity(eager(tiny_wrapper, *inputs), package(*inputs))
        for name, bound in AOTI_BOUNDS.items():
            assert parity["max_abs_diff"][name] <= bound, (b, p, k, name, parity["max_abs_diff"][name])
        assert parity["kept_at_top10"]["identical"], (b, p, k)
    images, tokens = example_inputs(tiny_wrapper, 1, 1, seed=17)
    with torch.inference_mode():  # called without boxes it pads, as the .pt2 does
        padded = compare_parity(source(images, tokens), package(images, tokens))
    assert all(padded["max_abs_diff"][n] <= bound for n, bound in AOTI_BOUNDS.items()), padded


def test_the_bf16_kind_with_boxes_is_bitwise_its_eager_twin(tiny_model, tmp_path) -> None:
    program = export_full_pipeline(tiny_model, boxes=True, autocast_dtype=torch.bfloat16)
    save_pipeline(program, tmp_path / "b.pt2")
    artifact = load_artifact(tmp_path / "b.pt2")
    assert artifact.takes_boxes and artifact.manifest.autocast_dtype == "bf16"
    twin = s3e.FullSam3PipelineWrapper(tiny_model, autocast_dtype=torch.bfloat16).eval()
    for b, p, k in [(2, 1, 3), (1, 2, 4)]:
        inputs = example_inputs(twin, b, p, seed=18, boxes=k)
        expected = eager(twin, *inputs)
        got = artifact(*inputs)
        assert all(o.dtype == torch.float32 for o in got)
        assert all(torch.equal(a, c) for a, c in zip(expected, got, strict=True)), (b, p, k)


def test_text_only_artifacts_refuse_boxes_and_box_artifacts_pad(tiny_artifact, box_pt2, tiny_wrapper) -> None:
    images, tokens, *boxes = example_inputs(tiny_wrapper, 2, 2, seed=14, boxes=2)
    text_only = load_artifact(tiny_artifact)
    with pytest.raises(InputSpecError, match=r"text-only artifact .* --boxes") as caught:
        text_only(images, tokens, *boxes)
    assert "\n" not in str(caught.value)
    with pytest.raises(InputSpecError, match="--boxes"):
        Predictor(text_only).predict([_image(2, 40, 50)], ["a dog"], boxes=[[[(1, 1, 20, 20)]]])
    with_boxes = load_artifact(box_pt2)
    assert with_boxes.takes_boxes and not text_only.takes_boxes
    with torch.inference_mode():
        implicit = with_boxes(images, tokens)
        explicit = with_boxes(images, tokens, *padding_boxes(2, 2, images))
    assert all(torch.equal(a, b) for a, b in zip(implicit, explicit, strict=True))
    with pytest.raises(InputSpecError, match="box_valid: expected with boxes, box_labels"):
        with_boxes(images, tokens, boxes=boxes[0], box_labels=boxes[1])


def test_bad_box_inputs_are_named() -> None:
    coords, labels, valid = padding_boxes(1, 2, np.zeros(1))
    cases = [
        ((coords[:, :1], labels, valid), "boxes: expected shape [1, 2, K, 4]"),
        ((coords[:, :, :0], labels[:, :, :0], valid[:, :, :0]), "K >= 1"),
        ((coords.astype(np.float64), labels, valid), "boxes: expected dtype float32"),
        ((coords, labels.astype(np.int32), valid), "box_labels: expected dtype int64"),
        ((coords, labels, valid.astype(np.int64)), "box_valid: expected dtype bool"),
        ((np.full_like(coords, np.nan), labels, valid), "boxes: expected finite values"),
        ((coords, labels * 2, valid), "box_labels: expected 0 (negative) or 1 (positive), got [2]"),
        ((coords, labels[:, :, :, None], valid), "box_labels: expected shape [1, 2, 1]"),
        (([1, 2], labels, valid), "boxes: expected a numpy array"),
    ]
    for args, message in cases:
        with pytest.raises(InputSpecError) as caught:
            check_box_inputs(*args, batch=1, prompts=2)
        assert message in str(caught.value), (message, str(caught.value))


def test_user_boxes_are_validated_and_clipped(predictor, images) -> None:
    assert parse_box((-10, 5, 50.5, 300, False), 100, 80, "b") == ExemplarBox(0, 5, 50.5, 80, False)
    assert parse_box(np.array([1, 2, 3, 4]), 10, 10, "b") == ExemplarBox(1, 2, 3, 4, True)
    bad = [
        ((1, 2, 3), "expected (x0, y0, x1, y1) or (x0, y0, x1, y1, label)"),
        ("1,2,3,4", "expected (x0, y0, x1, y1)"),
        ((1, 2, float("nan"), 4), "expected x1 finite"),
        ((1, 2, "3", 4), "expected x1 a number"),
        ((5, 2, 5, 4), "expected x1 > x0 and y1 > y0"),
        ((1, 4, 3, 2), "expected x1 > x0 and y1 > y0"),
        ((200, 2, 300, 4), "expected a box overlapping the 100x80 image"),
        ((1, 2, 3, 4, 2), "expected the label True/1 (positive) or False/0 (negative), got 2"),
    ]
    for value, message in bad:
        with pytest.raises(InputSpecError) as caught:
            parse_box(value, 100, 80, "boxes[0][0][1]")
        assert str(caught.value).startswith("boxes[0][0][1]: ") and message in str(caught.value), caught.value
    image = images[0]
    refusals = [
        (dict(phrases=[None]), "phrases: expected a phrase, got None (boxes alone) without boxes"),
        (dict(phrases=[None], boxes=[[[]]]), "phrases[0]: expected a phrase, or boxes in every image"),
        (dict(phrases=["a"], boxes=[[[]], [[]]]), "boxes: expected one row per image (1), got 2"),
        (dict(phrases=["a"], boxes=[[[], []]]), "boxes[0]: expected one list of boxes per phrase (1), got 2"),
        (dict(phrases=["a"], boxes=[["x"]]), "boxes[0][0]: expected a list of boxes"),
    ]
    for kwargs, message in refusals:
        with pytest.raises(InputSpecError) as caught:
            predictor.predict([image], kwargs["phrases"], boxes=kwargs.get("boxes"))
        assert message in str(caught.value), (message, str(caught.value))


def test_two_kinds_never_share_a_path(tmp_path: Path) -> None:
    with pytest.raises(InputSpecError, match="expected one file per kind, got pt2 and onnx both at"):
        artifact_paths(tmp_path / "m.onnx", ["pt2", "onnx"])
    paths = artifact_paths(tmp_path / "m.pt2", ["pt2", "aoti", "onnx"])
    assert sorted(p.name for p in paths.values()) == ["m.aoti.pt2", "m.onnx", "m.pt2"]
    status = main([*TINY_EXPORT, "--out", str(tmp_path / "x.pt2"), "--verify", "1,1,2"])  # K needs --boxes
    assert status == 2 and not (tmp_path / "x.pt2").exists()


def test_the_manifest_records_the_box_inputs(box_pt2) -> None:
    manifest = read_manifest(box_pt2)
    assert manifest.takes_boxes
    doc = json.loads(manifest.dumps())
    assert [i["name"] for i in doc["inputs"]] == ["images", "token_ids", "boxes", "box_labels", "box_valid"]
    assert [i["dtype"] for i in doc["inputs"][2:]] == ["float32", "int64", "bool"]
    assert doc["size_hints"]["num_boxes"] == 3


# -- the command line and batch jobs -----------------------------------------------------------


def _predict(model: Path, out: Path, *extra: str) -> list[str]:
    args = ["predict", "--model", str(model), "--out", str(out), "--threshold", str(THRESHOLD)]
    return [*args, "--malloc", "default", "--threads", "1", "--no-overlay", *extra]


def _lines(out: Path) -> dict[str, dict]:
    return {r["path"]: r for r in map(json.loads, (out / "results.jsonl").read_text().splitlines())}


@pytest.fixture(scope="module")
def photo_files(images, tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("box-photos")
    paths = [root / "landscape.png", root / "portrait.png"]
    for image, path in zip(images, paths, strict=True):
        image.save(path)
    return paths


def test_predict_box_and_negative_box_equal_the_predictor(predictor, photo_files, box_pt2, tmp_path) -> None:
    out = tmp_path / "one"
    args = ["--image", str(photo_files[0]), "--prompt", "a dog", "--box", "40,30,150,120"]
    status, _, err = run_cli(_predict(box_pt2, out, *args, "--negative-box", "200,50,300,180"))
    assert status == 0, err
    (line,) = _lines(out).values()
    (phrase,) = line["phrases"]
    assert phrase["prompt_boxes"] == [
        {"box": [40.0, 30.0, 150.0, 120.0], "positive": True},
        {"box": [200.0, 50.0, 300.0, 180.0], "positive": False},
    ]
    saved = torch.get_num_threads()
    torch.set_num_threads(1)  # as the command ran
    try:
        image = Image.open(photo_files[0])
        ours = predictor.predict([image], ["a dog"], THRESHOLD, boxes=[[BOXES[:2]]])[0][0]
    finally:
        torch.set_num_threads(saved)
    assert [i["score"] for i in phrase["instances"]] == ours.scores.tolist()
    assert [i["box_xyxy"] for i in phrase["instances"]] == ours.boxes.tolist()
    coco = json.loads((out / "coco.json").read_text())
    assert coco["images"][0]["prompt_boxes"] == [phrase["prompt_boxes"]]
    # boxes alone: no --prompt; recorded under upstream's phrase for it
    status, _, err = run_cli(
        _predict(box_pt2, tmp_path / "alone", "--image", str(photo_files[0]), "--box", "40,30,150,120")
    )
    assert status == 0, err
    (line,) = _lines(tmp_path / "alone").values()
    assert [p["phrase"] for p in line["phrases"]] == ["visual"]
    ours = predictor.predict([Image.open(photo_files[0])], [None], THRESHOLD, boxes=[[BOXES[:1]]])[0][0]
    assert [i["score"] for i in line["phrases"][0]["instances"]] == ours.scores.tolist()


def test_a_box_file_per_image_runs_alike_on_both_engines(box_pt2, photo_files, tmp_path) -> None:
    box_file = tmp_path / "boxes.jsonl"
    rows = {
        "path": str(photo_files[1]),
        "boxes": [[[10, 20, 120, 200]], [[30, 150, 140, 250, 0], [5, 5, 60, 60]]],
    }
    box_file.write_text(json.dumps(rows) + "\n")  # the landscape has no line: its phrases alone
    common = [
        "--image",
        str(photo_files[0].parent),
        "--prompt",
        "a dog",
        "--prompt",
        "a cat",
        "--boxes",
        str(box_file),
    ]
    status, _, err = run_cli(
        _predict(box_pt2, tmp_path / "local", *common, "--batch-size", "2", "--max-pairs", "4")
    )
    assert status == 0, err
    lines = _lines(tmp_path / "local")
    assert [len(p["prompt_boxes"]) for p in lines[str(photo_files[1])]["phrases"]] == [1, 2]
    assert [len(p["prompt_boxes"]) for p in lines[str(photo_files[0])]["phrases"]] == [0, 0]
    args = [*common, "--batch-size", "2", "--max-pairs", "4", "--engine", "ray", "--workers", "1"]
    status, _, err = run_cli(_predict(box_pt2, tmp_path / "ray", *args))
    assert status == 0, err
    local, ray = (tmp_path / "local" / "results.jsonl"), (tmp_path / "ray" / "results.jsonl")
    assert local.read_text() == ray.read_text()
    # another set of boxes is another job
    box_file.write_text(json.dumps({**rows, "boxes": [[[10, 20, 120, 201]], []]}) + "\n")
    status, _, err = run_cli(
        _predict(box_pt2, tmp_path / "local", *common, "--batch-size", "2", "--max-pairs", "4", "--resume")
    )
    assert status == 2 and "boxes (" in err and len(err.strip().splitlines()) == 1, err


def test_box_refusals_are_one_line(tiny_artifact, box_pt2, photo_files, tmp_path) -> None:
    image = ["--image", str(photo_files[0])]
    box_file = tmp_path / "b.jsonl"
    cases = [
        (
            _predict(tiny_artifact, tmp_path / "a", *image, "--prompt", "a", "--box", "1,1,9,9"),
            "export it with --boxes",
        ),
        (
            _predict(box_pt2, tmp_path / "b", *image, "--box", "1,1,0,9"),
            "expected finite X0 < X1 and Y0 < Y1",
        ),
        (_predict(box_pt2, tmp_path / "c", *image, "--box", "1,1,9"), "expected X0,Y0,X1,Y1 (four numbers)"),
        (_predict(box_pt2, tmp_path / "d", *image), "expected at least one text prompt"),
        (
            _predict(box_pt2, tmp_path / "e", *image, "--boxes", str(box_file)),
            "expected a readable JSONL file",
        ),
        (
            _predict(box_pt2, tmp_path / "f", *image, "--boxes", str(box_file), "--box", "1,1,9,9"),
            "either --boxes FILE or --box",
        ),
    ]
    for args, message in cases:
        status, _, err = run_cli(args)
        assert status == 2 and message in err and len(err.strip().splitlines()) == 1, (message, err)
        assert not Path(args[args.index("--out") + 1]).exists()
    for content, message in (
        ("not json\n", "line 1: expected a JSON object"),
        ('{"path": "x.png"}\n', 'line 1: expected {"path": "<image>", "boxes": [...]}'),
        (
            json.dumps({"path": str(photo_files[0]), "boxes": [[[1, 2, 3]]]}) + "\n",
            "line 1 boxes[0][0]: expected (x0",
        ),
        (
            json.dumps({"path": str(photo_files[0]), "boxes": [[], []]}) + "\n",
            "one list of boxes per phrase (1), got 2",
        ),
        (json.dumps({"path": "elsewhere.png", "boxes": [[]]}) + "\n", "not one of them"),
    ):
        box_file.write_text(content)
        status, _, err = run_cli(
            _predict(box_pt2, tmp_path / "g", *image, "--prompt", "a", "--boxes", str(box_file))
        )
        assert status == 2 and message in err and len(err.strip().splitlines()) == 1, (message, err)
    # null for a phrase is no box for it (as the Predictor's None): refused for boxes alone
    box_file.write_text(json.dumps({"path": str(photo_files[0]), "boxes": [None]}) + "\n")
    assert read_box_file(box_file, 1) == {str(photo_files[0].resolve()): [[]]}
    status, _, err = run_cli(_predict(box_pt2, tmp_path / "n", *image, "--boxes", str(box_file)))
    assert status == 2 and "got 1 image(s) without a box" in err, err
    # a box outside its image fails that image alone
    status, _, err = run_cli(
        _predict(box_pt2, tmp_path / "h", "--image", str(photo_files[0].parent), "--box", "10,210,100,250")
    )
    assert status == 1, err
    errors = [json.loads(line) for line in (tmp_path / "h" / "errors.jsonl").read_text().splitlines()]
    assert [Path(e["path"]).name for e in errors] == ["landscape.png"]
    assert "expected a box overlapping the 320x200 image" in errors[0]["error"]
    assert list(_lines(tmp_path / "h")) == [str(photo_files[1])]
