"""`sam3-exportable serve`: a real server (a local Ray instance) on 127.0.0.1 driven by a real
HTTP client: answers equal `predict`'s, concurrent requests share graph calls, every bad
input gets its documented status, limits, the API key, SIGTERM; and the parts without Ray
(options, request parsing, the load-test client)."""

from __future__ import annotations

import base64
import concurrent.futures
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from conftest import run_cli
from PIL import Image

from sam3_exportable.errors import InputSpecError
from sam3_exportable.serve import ServeOptions, read_api_key
from sam3_exportable.serve.loadtest import RunningServer, free_port, percentile, run_load, served
from sam3_exportable.serve.protocol import RequestError, parse_json

ROOT = Path(__file__).resolve().parents[1]
PHRASES = ["a dog", "a cat"]
THRESHOLD = 0.2  # random tiny weights score about 0.25: keeps instances on both sides
BOX = (10.0, 20.0, 90.0, 100.0)
KEY = "s3e-test-key-0123456789"
#: scores of one image across batch compositions (tiny model, CPU; as tests/test_batch.py)
SCORE_BOUND = 1e-5
#: every wait on the server is bounded
START_TIMEOUT_S, REQUEST_TIMEOUT_S, STOP_TIMEOUT_S = 180.0, 120.0, 60.0
MAX_QUEUED, MAX_BODY, MAX_PIXELS, MAX_PROMPTS = 8, 400_000, 200_000, 4


def _png(seed: int, height: int, width: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("serve-photos")
    paths = []
    for seed, (h, w) in enumerate([(120, 160), (150, 90)]):
        path = root / f"photo{seed}.png"
        path.write_bytes(_png(seed, h, w))
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def staged_boxes(tmp_path_factory) -> Path:
    """The tiny model with box inputs, in two stages (the feature cache works), written by
    the command users run."""
    out = tmp_path_factory.mktemp("serve-artifact") / "tiny-staged-boxes.pt2"
    args = ["export", "--size", "tiny", "--random-weights", "--malloc", "default", "--stages", "--boxes"]
    threads = torch.get_num_threads()
    status, _, err = run_cli([*args, "--out", str(out), "--threads", str(threads)])
    torch.set_num_threads(threads)
    assert status == 0, err
    return out


class Server:
    def __init__(self, running: RunningServer) -> None:
        self.process, self.url, self.log = running.process, running.url, running.log
        self.auth = {"authorization": f"Bearer {KEY}"}

    def post(self, body: dict | None = None, **kwargs) -> httpx.Response:
        kwargs.setdefault("headers", self.auth)
        if body is not None:
            kwargs["json"] = body
        return httpx.post(f"{self.url}/v1/segment", timeout=REQUEST_TIMEOUT_S, **kwargs)

    def get(self, path: str, **kwargs) -> httpx.Response:
        return httpx.get(f"{self.url}{path}", timeout=REQUEST_TIMEOUT_S, **kwargs)

    def ready(self) -> bool:
        return self.get("/readyz").status_code == 200


@pytest.fixture(scope="module")
def server(staged_boxes, tmp_path_factory):
    """`sam3-exportable serve` in its own process with a key, a long batch wait (so that
    concurrent requests surely meet), small limits; stopped by its PID."""
    root = tmp_path_factory.mktemp("serve")
    key_file = root / "key.txt"
    key_file.write_text(KEY + "\n")
    args = ["--threads", "1", "--api-key-file", str(key_file), "--malloc", "default"]
    args += ["--max-batch-size", "8", "--batch-wait-ms", "400", "--max-pairs", "8"]
    args += ["--max-queued", str(MAX_QUEUED), "--max-body-bytes", str(MAX_BODY)]
    args += ["--max-pixels", str(MAX_PIXELS), "--max-prompts", str(MAX_PROMPTS)]
    with served(staged_boxes, args, root / "serve.log", ready_timeout_s=START_TIMEOUT_S) as running:
        yield Server(running)


def _b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def _predict(artifact: Path, photos: list[Path], out: Path, *extra: str) -> dict[str, dict]:
    threads = torch.get_num_threads()
    args = ["predict", "--model", str(artifact), "--out", str(out), "--threshold", str(THRESHOLD)]
    args += ["--malloc", "default", "--threads", "1", "--max-pairs", "8", "--no-overlay", "--no-masks"]
    for phrase in PHRASES:
        args += ["--prompt", phrase]
    for photo in photos:
        args += ["--image", str(photo)]
    status, _, err = run_cli(args + list(extra))
    torch.set_num_threads(threads)
    assert status == 0, err
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    for record in records:  # an answer is results.jsonl's record without the job's files
        for phrase in record["phrases"]:
            assert phrase.pop("mask_png") is None
    return {record["path"]: record for record in records}


def test_answers_equal_predicts_results(server, staged_boxes, photos, tmp_path) -> None:
    """One request at a time (batch size 1): JSON and multipart, with and without exemplar
    boxes, bitwise what `predict` writes at the same threads."""
    plain = _predict(staged_boxes, photos, tmp_path / "plain")
    boxed = _predict(staged_boxes, photos, tmp_path / "boxed", "--box", ",".join(map(str, BOX)))
    for photo in photos:
        answer = server.post({"image": _b64(photo), "prompts": PHRASES, "threshold": THRESHOLD})
        assert answer.status_code == 200, answer.text
        got = answer.json()
        assert got["timing"]["batch_size"] == 1
        expected = plain[str(photo)]
        assert (got["width"], got["height"]) == (expected["width"], expected["height"])
        assert got["phrases"] == expected["phrases"]
        assert any(p["instances"] for p in got["phrases"])  # something to compare

        form = server.post(
            files={"image": (photo.name, photo.read_bytes(), "image/png")},
            data={"prompt": PHRASES, "threshold": str(THRESHOLD), "boxes": json.dumps([[BOX], [BOX]])},
        )
        assert form.status_code == 200, form.text
        assert form.json()["phrases"] == boxed[str(photo)]["phrases"]
        assert form.json()["phrases"][0]["prompt_boxes"] == [{"box": list(BOX), "positive": True}]

    lean = server.post(
        {"image": _b64(photos[0]), "prompts": PHRASES, "threshold": THRESHOLD, "masks": "none"}
    )
    full = plain[str(photos[0])]["phrases"]
    assert lean.json()["phrases"] == [
        {**p, "instances": [{k: v for k, v in i.items() if k != "rle"} for i in p["instances"]]} for p in full
    ]


def test_a_follow_up_prompt_reuses_the_cached_image_features(server, photos) -> None:
    before = server.get("/v1/model", headers=server.auth).json()["cache"]
    first = server.post({"image": _b64(photos[1]), "prompts": ["a bird"], "threshold": THRESHOLD})
    again = server.post({"image": _b64(photos[1]), "prompts": ["a tree"], "threshold": THRESHOLD})
    assert first.status_code == again.status_code == 200
    after = server.get("/v1/model", headers=server.auth).json()["cache"]
    assert after["hits"] >= before["hits"] + 1
    assert 0 < after["bytes"] <= after["max_bytes"]


def test_concurrent_requests_share_graph_calls_within_the_batched_bound(server, photos) -> None:
    bodies = [{"image": _b64(photos[i % 2]), "prompts": PHRASES, "threshold": THRESHOLD} for i in range(8)]
    alone = [server.post(body).json() for body in bodies[:2]]
    with concurrent.futures.ThreadPoolExecutor(len(bodies)) as pool:
        answers = list(pool.map(server.post, bodies))
    assert [a.status_code for a in answers] == [200] * len(bodies)
    sizes = [a.json()["timing"]["batch_size"] for a in answers]
    assert max(sizes) > 1, sizes
    worst = 0.0
    for i, answer in enumerate(answers):
        for a, b in zip(alone[i % 2]["phrases"], answer.json()["phrases"], strict=True):
            keep = [x["score"] for x in a["instances"] if abs(x["score"] - THRESHOLD) > SCORE_BOUND]
            other = [x["score"] for x in b["instances"] if abs(x["score"] - THRESHOLD) > SCORE_BOUND]
            assert len(keep) == len(other)
            worst = max([worst, *(abs(x - y) for x, y in zip(keep, other, strict=True))])
    print(f"batch sizes {sizes}: max |score diff| against batch size 1: {worst:.2g}")
    assert worst <= SCORE_BOUND


def _bad_requests(photos: list[Path]) -> list[tuple[str, dict, int, str]]:
    """(what, httpx.post keyword arguments, status, field) for each kind of bad input."""
    image = _b64(photos[0])
    good = {"image": image, "prompts": PHRASES}
    json_type = {"content-type": "application/json", "authorization": f"Bearer {KEY}"}
    flat = io.BytesIO()
    Image.new("RGB", (500, 500), (90, 120, 30)).save(flat, format="PNG")
    big = base64.b64encode(flat.getvalue()).decode()  # 250,000 pixels > MAX_PIXELS, a small file
    return [
        ("malformed JSON", {"content": b'{"image": ', "headers": json_type}, 400, "body"),
        ("not an object", {"json": [1, 2]}, 422, "body"),
        ("unknown field", {"json": {**good, "url": "http://example.com/a.jpg"}}, 422, "url"),
        ("no image", {"json": {"prompts": PHRASES}}, 422, "image"),
        ("bad base64", {"json": {**good, "image": "not base64!"}}, 400, "image"),
        ("not an image", {"json": {**good, "image": base64.b64encode(b"GIF89a-no").decode()}}, 400, "image"),
        ("too many pixels", {"json": {**good, "image": big}}, 422, "image"),
        ("no prompts", {"json": {**good, "prompts": []}}, 422, "prompts"),
        ("blank phrase", {"json": {**good, "prompts": ["a dog", "  "]}}, 422, "prompts[1]"),
        ("too many prompts", {"json": {**good, "prompts": ["a"] * (MAX_PROMPTS + 1)}}, 422, "prompts"),
        ("phrase without tokens", {"json": {**good, "prompts": ["&nbsp;"]}}, 422, "prompts[0]"),
        ("threshold", {"json": {**good, "threshold": 1.5}}, 422, "threshold"),
        ("masks", {"json": {**good, "masks": "png"}}, 422, "masks"),
        ("boxes per prompt", {"json": {**good, "boxes": [[list(BOX)]]}}, 422, "boxes"),
        ("box outside", {"json": {**good, "boxes": [[[500, 500, 600, 600]], []]}}, 422, "boxes[0]"),
        ("null without boxes", {"json": {**good, "prompts": [None]}}, 422, "prompts"),
        ("form without image", {"data": {"prompt": PHRASES}, "files": {"x": ("x", b"1")}}, 422, "x"),
        (
            "form bad threshold",
            {
                "data": {"prompt": PHRASES, "threshold": "high"},
                "files": {"image": ("a.png", photos[0].read_bytes())},
            },
            422,
            "threshold",
        ),
        (
            "content type",
            {"content": b"abc", "headers": {**json_type, "content-type": "text/plain"}},
            415,
            "content-type",
        ),
    ]


def test_every_bad_input_gets_its_status_and_a_json_error(server, photos) -> None:
    for what, kwargs, status, field in _bad_requests(photos):
        answer = server.post(**kwargs)
        assert answer.status_code == status, (what, answer.text)
        body = answer.json()
        assert body["error"]["field"].startswith(field), (what, body)
        assert body["error"]["message"] and "\n" not in body["error"]["message"], (what, body)
    assert server.ready()
    assert server.post({"image": _b64(photos[0]), "prompts": PHRASES}).status_code == 200


def test_an_oversized_body_gets_413(server) -> None:
    declared = server.post(
        content=b"x" * (MAX_BODY + 1), headers={**server.auth, "content-type": "application/json"}
    )
    assert declared.status_code == 413 and declared.json()["error"]["field"] == "body"

    def chunks():  # no Content-Length: refused while it streams in
        for _ in range(MAX_BODY // 65536 + 2):
            yield b"x" * 65536

    streamed = server.post(content=chunks(), headers={**server.auth, "content-type": "application/json"})
    assert streamed.status_code == 413 and streamed.json()["error"]["field"] == "body"
    assert server.ready()


def test_v1_needs_the_key_and_the_key_is_never_logged(server, photos) -> None:
    body = {"image": _b64(photos[0]), "prompts": PHRASES}
    for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": KEY}):
        for answer in (server.post(body, headers=headers), server.get("/v1/model", headers=headers)):
            assert answer.status_code == 401, answer.text
            assert answer.json()["error"]["field"] == "authorization"
            assert answer.headers["www-authenticate"] == "Bearer"
    assert server.get("/healthz").json() == {"status": "ok"}  # probes need no key
    model = server.get("/v1/model", headers=server.auth).json()
    assert model["manifest"]["kind"] == "pt2" and model["staged"] and model["takes_boxes"]
    assert model["settings"]["max_queued"] == MAX_QUEUED and "api_key_sha256" not in model["settings"]
    assert model["replica"]["peak_rss_bytes"] > 0
    # the replica's own process took --malloc (a replica left alone says "not requested")
    assert model["replica"]["malloc"] == {"policy": "default", "applied": False, "reason": "requested"}
    assert KEY not in server.log.read_text()
    spec = server.get("/openapi.json").json()
    assert "/v1/segment" in spec["paths"] and server.get("/docs").status_code == 200


def test_past_max_queued_requests_get_503_with_retry_after(server, photos) -> None:
    body = {"image": _b64(photos[0]), "prompts": PHRASES}
    with concurrent.futures.ThreadPoolExecutor(24) as pool:
        answers = list(pool.map(lambda _: server.post(body), range(24)))
    codes = sorted(a.status_code for a in answers)
    refused = [a for a in answers if a.status_code == 503]
    assert set(codes) == {200, 503} and codes.count(200) >= MAX_QUEUED, codes
    assert all(int(a.headers["retry-after"]) >= 1 and a.json()["error"]["field"] == "server" for a in refused)
    assert server.ready()


def test_the_load_test_client_reports_batches_and_latency(server, photos) -> None:
    bodies = [{"image": _b64(p), "prompts": PHRASES, "threshold": THRESHOLD} for p in photos]
    report = run_load(server.url, bodies, clients=4, requests=8, timeout_s=REQUEST_TIMEOUT_S, api_key=KEY)
    summary = report.summary()
    assert summary["errors"] == {} and report.ok == 8, summary
    assert summary["mean_batch_size"] > 1 and summary["requests_per_s"] > 0
    assert 0 < summary["p50_ms"] <= summary["p95_ms"] <= summary["p99_ms"]


def test_a_replica_that_dies_is_replaced_and_its_request_answered_in_json(server, photos) -> None:
    pid = server.get("/v1/model", headers=server.auth).json()["replica"]["pid"]
    result: dict[str, httpx.Response] = {}
    body = {"image": _b64(photos[0]), "prompts": PHRASES}
    thread = threading.Thread(target=lambda: result.setdefault("answer", server.post(body)))
    thread.start()
    time.sleep(0.2)  # in the batch's 400 ms wait
    os.kill(pid, signal.SIGKILL)
    thread.join(REQUEST_TIMEOUT_S)
    lost = result["answer"]
    assert lost.status_code == 503 and lost.json()["error"]["field"] == "server", lost.text
    assert int(lost.headers["retry-after"]) >= 1
    deadline = time.monotonic() + START_TIMEOUT_S
    while not server.ready():
        assert time.monotonic() < deadline, "no replica came back"
        time.sleep(0.5)
    assert server.get("/v1/model", headers=server.auth).json()["replica"]["pid"] != pid
    assert server.post(body).status_code == 200


def test_sigterm_answers_the_requests_in_flight_then_stops(server, photos) -> None:
    """Last of the module: stops the server."""
    result: dict[str, httpx.Response] = {}
    thread = threading.Thread(
        target=lambda: result.setdefault(
            "answer", server.post({"image": _b64(photos[0]), "prompts": PHRASES})
        )
    )
    thread.start()
    time.sleep(0.2)  # in the batch's 400 ms wait
    started = time.monotonic()
    server.process.send_signal(signal.SIGTERM)
    thread.join(REQUEST_TIMEOUT_S)
    assert result["answer"].status_code == 200
    assert server.process.wait(STOP_TIMEOUT_S) == 0
    print(f"stopped {time.monotonic() - started:.1f} s after SIGTERM")
    assert "stopped (SIGTERM)" in server.log.read_text()


# --- without a server ---------------------------------------------------------------------


def test_options_are_checked() -> None:
    assert ServeOptions(model="a.pt2").max_ongoing > 8
    for field, value in [
        ("port", 0),
        ("port", 70000),
        ("threads", 0),
        ("max_queued", -1),
        ("batch_wait_ms", -1),
        ("malloc", "jemalloc"),
    ]:
        with pytest.raises(InputSpecError, match="--" + field.replace("_", "-")):
            ServeOptions(model="a.pt2", **{field: value})


def test_the_api_key_file_gives_only_a_hash(tmp_path) -> None:
    path = tmp_path / "key"
    path.write_text(f"  {KEY}  \nignored\n")
    digest = read_api_key(path)
    assert KEY not in digest and len(digest) == 64
    path.write_text("\n")
    with pytest.raises(InputSpecError, match="--api-key-file"):
        read_api_key(path)


def test_the_python_entry_point_builds_the_application_users_deploy(tmp_path) -> None:
    """``app_builder`` (a Serve config file's ``import_path``) as ``serve`` builds it: N model
    replicas reserving --threads CPUs each behind one ingress that reserves none, every
    replica told the same options, the key only as its hash. Nothing is started."""
    from ray import serve

    from sam3_exportable.serve.app import app_builder

    key_file = tmp_path / "key"
    key_file.write_text(KEY + "\n")
    args = {"model": "a.pt2", "replicas": 2, "threads": 3, "max_queued": 5, "api_key_file": str(key_file)}
    app = app_builder(args)
    assert isinstance(app, serve.Application)
    ingress = app._bound_deployment
    model = ingress.init_args[0]._bound_deployment
    digest = read_api_key(key_file)
    options = ServeOptions(model="a.pt2", replicas=2, threads=3, max_queued=5, api_key_sha256=digest)
    assert (ingress.name, ingress.num_replicas) == ("Sam3Ingress", 1)
    assert ingress.ray_actor_options == {"num_cpus": 0}
    assert (model.name, model.num_replicas, model.ray_actor_options) == ("Sam3Model", 2, {"num_cpus": 3})
    assert model.max_ongoing_requests == options.max_ongoing
    assert ingress.max_ongoing_requests == 2 * options.max_ongoing
    assert model.init_args == (options.to_json(),) and ingress.init_args[1] == options.to_json()
    assert KEY not in json.dumps(options.to_json())
    with pytest.raises(InputSpecError, match="--replicas"):
        app_builder({"model": "a.pt2", "replicas": 0})


def test_parse_json_names_the_field(photos) -> None:
    limits = {"max_pixels": MAX_PIXELS, "max_prompts": MAX_PROMPTS, "max_boxes": 2}
    good = {"image": _b64(photos[0]), "prompts": PHRASES}
    request = parse_json(json.dumps(good).encode(), **limits)
    assert request.image.size == (160, 120) and request.prompts == tuple(PHRASES) and request.rle
    with pytest.raises(RequestError) as refused:
        parse_json(json.dumps({**good, "boxes": [[list(BOX)] * 2, [list(BOX)]]}).encode(), **limits)
    assert (refused.value.status, refused.value.field) == (422, "boxes")
    assert "at most 2 boxes, got 3" in refused.value.message


def test_percentiles() -> None:
    assert percentile([3.0, 1.0, 2.0, 4.0], 50) == 2.5
    assert percentile([5.0], 99) == 5.0


def test_serve_refuses_bad_arguments_in_one_line(staged_boxes, tmp_path) -> None:
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    try:
        cases = [
            (["--model", str(tmp_path / "missing.pt2")], "missing.pt2"),
            (["--model", str(staged_boxes), "--port", str(taken.getsockname()[1])], "--port"),
            (["--model", str(staged_boxes), "--api-key-file", str(tmp_path / "nokey")], "nokey"),
            (["--model", str(staged_boxes), "--max-queued", "-1"], "--max-queued"),
        ]
        for args, named in cases:
            run = subprocess.run(
                [sys.executable, "-m", "sam3_exportable.cli", "serve", *args],
                capture_output=True,
                text=True,
                timeout=120,
            )
            assert run.returncode == 2, run.stderr
            lines = run.stderr.strip().splitlines()
            assert len(lines) == 1 and named in lines[0] and "Traceback" not in run.stderr, run.stderr
    finally:
        taken.close()


def test_an_artifact_that_fails_to_load_stops_the_command_in_one_line(tiny_artifact, tmp_path) -> None:
    """The manifest reads, the file does not match its hash: the replica says so on
    `/readyz`, and the command stops, exit status 2, one line naming the artifact."""
    import shutil

    broken = tmp_path / "broken.pt2"
    shutil.copy(tiny_artifact, broken)
    shutil.copy(f"{tiny_artifact}.json", f"{broken}.json")
    with broken.open("r+b") as f:
        f.seek(broken.stat().st_size // 2)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0xFF]))
    command = [sys.executable, "-m", "sam3_exportable.cli", "serve", "--model", str(broken)]
    run = subprocess.run(
        [*command, "--threads", "1", "--port", str(free_port())],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 2, run.stderr[-3000:]
    errors = [line for line in run.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "sha256" in errors[0] and "Traceback" not in run.stderr, run.stderr[-3000:]


def test_an_onnx_replica_imports_no_torch(onnx_pair, photos) -> None:
    """What a replica of an ONNX artifact runs (the application module with Ray Serve and
    FastAPI, the segmenter, a request) in a Python where torch cannot be imported."""
    code = f"""
import sys, base64, json
class NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "torchvision", "sam3"):
            raise ImportError("torch is blocked in this test")
sys.meta_path.insert(0, NoTorch())
import sam3_exportable.serve.app
from sam3_exportable.serve.options import ServeOptions
from sam3_exportable.serve.protocol import parse_json
from sam3_exportable.serve.segmenter import Segmenter
segmenter = Segmenter(ServeOptions(model={str(onnx_pair[0])!r}, threads=1))
image = base64.b64encode(open({str(photos[0])!r}, "rb").read()).decode()
body = json.dumps({{"image": image, "prompts": ["a dog"]}})
request = parse_json(body.encode(), max_pixels=10**7, max_prompts=4, max_boxes=4)
answer, = segmenter.run([segmenter.check(request)])
assert answer.batch_size == 1 and answer.width == 160, answer
assert "torch" not in sys.modules
print("ok")
"""
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stderr[-3000:]
