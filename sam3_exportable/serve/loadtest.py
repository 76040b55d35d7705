"""Concurrent HTTP clients against a running server (:func:`run_load`), and the server as a
process of its own (:func:`served`): what the bench's ``serve`` section and the tests run.
Uses httpx; imports neither Ray nor torch."""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

__all__ = ["LoadReport", "RunningServer", "free_port", "percentile", "run_load", "served"]


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on now (the OS's pick)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


@dataclasses.dataclass
class RunningServer:
    """A ``sam3-exportable serve`` process: its ``url``, ``process`` and ``log`` (stdout and
    stderr); ``ready_s`` from start to ``/readyz`` 200, ``stop_s`` from SIGTERM to exit."""

    url: str
    process: subprocess.Popen[bytes]
    log: Path
    ready_s: float = 0.0
    stop_s: float | None = None

    def stop(self, timeout_s: float = 300.0) -> int:
        """SIGTERM, then wait at most ``timeout_s`` (then kill); the exit status."""
        if self.process.poll() is None:
            started = time.monotonic()
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(30)
            self.stop_s = time.monotonic() - started
        return int(self.process.returncode)


@contextlib.contextmanager
def served(
    model: str | Path, args: Sequence[str], log: Path, *, ready_timeout_s: float = 900.0
) -> Iterator[RunningServer]:
    """``sam3-exportable serve --model MODEL --port <free> ARGS`` in its own process, ready
    (``/readyz`` 200) for the body, stopped by SIGTERM after it.

    Raises ``RuntimeError`` (with the log's tail) when it exits or is not ready within
    ``ready_timeout_s``."""
    import httpx

    port = free_port()
    command = [
        sys.executable,
        "-m",
        "sam3_exportable.cli",
        "serve",
        "--model",
        str(model),
        "--port",
        str(port),
    ]
    started = time.monotonic()
    with log.open("wb") as sink:
        process = subprocess.Popen([*command, *args], stdout=sink, stderr=subprocess.STDOUT)
    server = RunningServer(f"http://127.0.0.1:{port}", process, log)
    try:
        while True:
            if process.poll() is not None or time.monotonic() - started > ready_timeout_s:
                tail = log.read_text(errors="replace")[-3000:]
                raise RuntimeError(f"serve: not ready (exit status {process.poll()}): {tail}")
            try:
                if httpx.get(f"{server.url}/readyz", timeout=10).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        server.ready_s = time.monotonic() - started
        yield server
    finally:
        server.stop()


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100) of ``values`` by linear interpolation; NaN when empty."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100.0
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


@dataclasses.dataclass
class LoadReport:
    """``requests`` sent by ``clients`` concurrent clients in ``seconds``: ``statuses``
    counts each HTTP status (``"error"``: no answer, e.g. a timeout), ``latencies_ms`` of the
    200s, ``batch_sizes`` the ``timing.batch_size`` of each 200."""

    clients: int
    requests: int
    seconds: float
    statuses: dict[str, int]
    latencies_ms: list[float]
    batch_sizes: list[int]

    @property
    def ok(self) -> int:
        return self.statuses.get("200", 0)

    def summary(self) -> dict[str, Any]:
        """The figures a table shows: requests/s (of 200s), p50/p95/p99 latency, mean batch
        size, errors by status."""
        return {
            "clients": self.clients,
            "requests": self.requests,
            "seconds": round(self.seconds, 3),
            "requests_per_s": round(self.ok / self.seconds, 3) if self.seconds > 0 else 0.0,
            "p50_ms": round(percentile(self.latencies_ms, 50), 1),
            "p95_ms": round(percentile(self.latencies_ms, 95), 1),
            "p99_ms": round(percentile(self.latencies_ms, 99), 1),
            "mean_batch_size": round(sum(self.batch_sizes) / len(self.batch_sizes), 2)
            if self.batch_sizes
            else 0.0,
            "errors": {code: n for code, n in sorted(self.statuses.items()) if code != "200"},
        }


def run_load(
    url: str,
    bodies: Sequence[dict[str, Any]],
    *,
    clients: int,
    requests: int,
    timeout_s: float = 600.0,
    api_key: str | None = None,
) -> LoadReport:
    """Send ``requests`` JSON requests (``bodies`` in turn) to ``url/v1/segment`` from
    ``clients`` threads, each with its own connection, as fast as answers come.

    Raises ``ValueError`` for no body, ``clients < 1`` or ``requests < 1``."""
    import httpx

    if not bodies or clients < 1 or requests < 1:
        raise ValueError(
            f"run_load: expected bodies, clients and requests, got {len(bodies)}, {clients}, {requests}"
        )
    payloads = [json.dumps(body).encode() for body in bodies]
    headers = {"content-type": "application/json"}
    if api_key is not None:
        headers["authorization"] = f"Bearer {api_key}"
    lock = threading.Lock()
    counter = iter(range(requests))
    statuses: collections.Counter[str] = collections.Counter()
    latencies: list[float] = []
    batches: list[int] = []

    def client() -> None:
        with httpx.Client(timeout=timeout_s, headers=headers) as session:
            while True:
                with lock:
                    n = next(counter, None)
                if n is None:
                    return
                started = time.perf_counter()
                try:
                    answer = session.post(f"{url}/v1/segment", content=payloads[n % len(payloads)])
                    code = str(answer.status_code)
                    size = answer.json()["timing"]["batch_size"] if answer.status_code == 200 else None
                except httpx.HTTPError:
                    code, size = "error", None
                elapsed = (time.perf_counter() - started) * 1000.0
                with lock:
                    statuses[code] += 1
                    if size is not None:
                        latencies.append(elapsed)
                        batches.append(int(size))

    threads = [threading.Thread(target=client, name=f"load-client-{i}") for i in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return LoadReport(clients, requests, time.perf_counter() - started, dict(statuses), latencies, batches)
