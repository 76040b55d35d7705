"""Where a job's batches run: in this process (``local``) or on Ray workers (``ray``).

Both yield, batch by batch in plan order, the :class:`~.segment.ImageOutcome` of every image
of the batch; the driver only writes them. Outcomes are bitwise the same on both engines
and for any number of workers when each worker uses the same torch thread count.

Ray (``pip install 'sam3-exportable[ray]'``) is imported only here, only when used. Without
an address a fresh local instance is started (``address="local"``, so ``RAY_ADDRESS`` is
ignored) with ``workers * threads`` CPUs, and shut down after; with one, this process
connects to that cluster and only disconnects after. A process already connected
(``ray.is_initialized()``) is used as it is and left connected.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import signal
import socket
import tempfile
import threading
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

from ..errors import MissingExtraError, WorkerError
from .segment import ImageOutcome, SegmentBatch, outcomes_from_columns

__all__ = ["import_ray", "local_outcomes", "ray_outcomes", "ray_session"]

RAY_EXTRA = "pip install 'sam3-exportable[ray]'"


def local_outcomes(segmenter: SegmentBatch, batches: Sequence[Sequence[str]]) -> Iterator[list[ImageOutcome]]:
    """Each batch of image paths through ``segmenter``, in order, in this process."""
    for paths in batches:
        yield segmenter.segment(list(paths))


def import_ray() -> Any:
    """The ``ray`` module with Ray Data. Raises :class:`~..errors.MissingExtraError` naming
    the extra to install.

    Ray reads its settings when first imported: no usage statistics are sent, and a local
    instance authenticates its clients by token (unless the environment says otherwise).
    """
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    try:
        import ray
        import ray.data
    except ImportError as exc:
        raise MissingExtraError(
            f"--engine ray: expected Ray Data to be installed, it is not ({exc}); {RAY_EXTRA}"
        ) from None
    return ray


@contextlib.contextmanager
def ray_session(
    *, address: str | None, num_cpus: int, runtime_env: dict[str, Any] | None = None
) -> Iterator[Any]:
    """A connected ``ray`` module for the body (see the module docstring for which).

    Ray installs its own SIGTERM handler when it starts: the handlers of SIGINT and SIGTERM
    this process had are put back right after, and again after the shutdown. A local
    instance's files (a short temporary directory) are removed after, except when a worker
    failed: the :class:`~..errors.WorkerError` then names the directory with the logs.
    """
    ray = import_ray()
    if ray.is_initialized():
        yield ray
        return
    main = threading.current_thread() is threading.main_thread()
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)} if main else {}
    quiet: dict[str, Any] = {"log_to_driver": False, "logging_level": logging.WARNING}
    if runtime_env:
        quiet["runtime_env"] = runtime_env
    if address:
        _check_reachable(address)
    temp_dir = None
    try:
        try:
            if address:
                ray.init(address=address, **quiet)
            else:
                # Ray's sockets live under its temp dir, whose path must stay short (AF_UNIX)
                temp_dir = tempfile.mkdtemp(prefix="s3e-ray-", dir="/tmp")
                ray.init(
                    address="local", num_cpus=num_cpus, include_dashboard=False, _temp_dir=temp_dir, **quiet
                )
        except (ConnectionError, RuntimeError, ValueError, TimeoutError) as exc:
            what = (
                f"--ray-address {address}: could not connect"
                if address
                else "--engine ray: Ray did not start"
            )
            raise WorkerError(f"{what}: {_first_line(exc)}") from exc
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        try:
            yield ray
        except WorkerError as exc:
            if temp_dir is None:
                raise
            keep, temp_dir = temp_dir, None  # its logs say what happened
            raise WorkerError(f"{exc} (Ray's logs: {keep})") from exc.__cause__
    finally:
        ray.shutdown()
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        if temp_dir is not None:
            shutil.rmtree(temp_dir, ignore_errors=True)


@contextlib.contextmanager
def _quiet_data_context(ray: Any) -> Iterator[Any]:
    """Ray Data's context without progress bars, banners or console log lines (its log file
    keeps them; a failure surfaces as one :class:`~..errors.WorkerError`), keeping the plan's
    order; the caller's settings are put back after."""
    ctx = ray.data.DataContext.get_current()
    saved = (ctx.enable_progress_bars, ctx.print_on_execution_start, ctx.execution_options.preserve_order)
    console = [
        (h, h.level)
        for h in logging.getLogger("ray.data").handlers
        if type(h).__name__ != "SessionFileHandler"
    ]
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    ctx.execution_options.preserve_order = True
    for handler, _ in console:
        handler.setLevel(logging.CRITICAL)
    try:
        yield ctx
    finally:
        ctx.enable_progress_bars, ctx.print_on_execution_start, ctx.execution_options.preserve_order = saved
        for handler, level in console:
            handler.setLevel(level)


def ray_outcomes(
    ray: Any,
    batches: Sequence[Sequence[str]],
    segmenter_kwargs: dict[str, Any],
    *,
    workers: int,
    threads: int,
) -> Iterator[list[ImageOutcome]]:
    """Each batch of image paths through a pool of ``workers`` :class:`~.segment.SegmentBatch`
    actors of ``threads`` CPUs each (constructed with ``segmenter_kwargs``), in plan order,
    each batch as soon as it and the ones before it are done.

    A worker that dies is not restarted (a batch that kills its worker for memory would do it
    again, forever): the run stops with :class:`~..errors.WorkerError`, and a resumed run
    continues it.
    """
    rows = [{"paths": list(paths)} for paths in batches]
    with _quiet_data_context(ray), warnings.catch_warnings():
        # Ray Data 2.60 takes max_restarts only among its deprecated **ray_remote_args
        warnings.simplefilter("ignore", ray.util.annotations.RayDeprecationWarning)
        dataset = ray.data.from_items(rows, override_num_blocks=len(rows)).map_batches(
            SegmentBatch,
            batch_size=1,
            batch_format="numpy",
            num_cpus=threads,
            # one batch in flight per worker: queued batches go to whichever worker is free
            compute=ray.data.ActorPoolStrategy(size=workers, max_tasks_in_flight_per_actor=1),
            fn_constructor_kwargs={**segmenter_kwargs, "threads": threads},
            max_restarts=0,
        )
        try:
            for columns in dataset.iter_batches(batch_size=None, prefetch_batches=0, batch_format="numpy"):
                yield outcomes_from_columns(columns)
        except ray.exceptions.RayError as exc:
            raise WorkerError(f"--engine ray: a worker failed: {_first_line(exc)}") from exc


def _first_line(exc: BaseException) -> str:
    line = next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
    return line[:300]


def _check_reachable(address: str, timeout_s: float = 10.0) -> None:
    """Raise :class:`~..errors.WorkerError` unless a ``host:port`` address accepts a TCP
    connection within ``timeout_s`` (Ray itself retries an unreachable one for minutes).
    Other forms (``ray://...``, ``auto``) are left to Ray."""
    match = re.fullmatch(r"([^\s:/]+):(\d+)", address)
    if match is None:
        return
    try:
        socket.create_connection((match.group(1), int(match.group(2))), timeout_s).close()
    except OSError as exc:
        raise WorkerError(
            f"--ray-address {address}: expected a running Ray cluster there, could not connect: "
            f"{exc.strerror or exc}"
        ) from None
