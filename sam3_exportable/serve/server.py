"""``sam3-exportable serve``: the application on a local Ray instance (or an existing
cluster), until SIGTERM or Ctrl-C, then drained and stopped (:func:`serve_artifact`)."""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator

from ..artifact.manifest import read_manifest
from ..errors import ArtifactError, InputSpecError, MissingExtraError
from .options import ServeOptions

_log = logging.getLogger(__name__)

__all__ = ["APP_NAME", "SERVE_EXTRA", "serve_artifact"]

#: The Ray Serve application's name (``serve status`` shows it).
APP_NAME = "sam3"

SERVE_EXTRA = "pip install 'sam3-exportable[serve]'"


def _check_port_free(host: str, port: int) -> None:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise InputSpecError(
                f"--port {port}: expected a free port on {host}, got {exc.strerror}"
            ) from None


def _import_serve() -> None:
    from ..batch.engines import import_ray

    import_ray()  # first: Ray reads its settings (auth, usage stats) when first imported
    try:
        import fastapi  # noqa: F401
        import ray.serve  # noqa: F401
    except ImportError as exc:
        raise MissingExtraError(f"serve: expected Ray Serve and FastAPI, got {exc}; {SERVE_EXTRA}") from None


def _local_url(options: ServeOptions) -> str:
    host = "127.0.0.1" if options.host in ("0.0.0.0", "") else options.host
    host = "[::1]" if host == "::" else (f"[{host}]" if ":" in host else host)
    return f"http://{host}:{options.port}"


def _wait_ready(url: str, timeout_s: float = 3600.0) -> None:
    """Poll ``url/readyz`` until 200; raises :class:`~..errors.ArtifactError` when the
    replica says its artifact failed to load, ``TimeoutError`` past ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/readyz", timeout=5) as answer:
                if answer.status == 200:
                    return
        except urllib.error.HTTPError as exc:
            with contextlib.suppress(ValueError):
                body = json.loads(exc.read() or b"{}")
                if body.get("status") == "failed":
                    raise ArtifactError(
                        f"--model: the replica could not load it: {body.get('error')}"
                    ) from None
        except (urllib.error.URLError, OSError):
            pass  # the proxy or the route is not up yet
        time.sleep(0.25)
    raise TimeoutError(f"the server at {url} was not ready within {timeout_s:.0f} s")


def _bounded(func: Callable[[], object], timeout_s: float) -> None:
    """``func()`` in a daemon thread, waited for at most ``timeout_s``; its failure is logged."""

    def run() -> None:
        try:
            func()
        except Exception:
            _log.exception("stopping Ray Serve failed")

    thread = threading.Thread(target=run, name="sam3-serve-stop", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        _log.warning("Ray Serve did not stop within %.0f s; stopping Ray", timeout_s)


@contextlib.contextmanager
def _deployed(options: ServeOptions, ray_address: str | None) -> Iterator[str]:
    from ..batch.engines import ray_session
    from .app import DRAIN_TIMEOUT_S, build_app

    with ray_session(address=ray_address, num_cpus=options.replicas * options.threads):
        from ray import serve

        serve.start(http_options={"host": options.host, "port": options.port})
        try:
            serve.run(build_app(options), name=APP_NAME, route_prefix="/", blocking=False)
            yield _local_url(options)
        finally:
            # The application first, while the proxy still carries answers: its replicas
            # answer their requests in flight, then stop. Then, on a local instance, Serve
            # itself (on someone else's cluster only what was deployed goes). Bounded: a Ray
            # whose processes were signalled with this one cannot answer at all.
            def stop() -> None:
                serve.delete(APP_NAME)
                if not ray_address:
                    serve.shutdown()

            _bounded(stop, DRAIN_TIMEOUT_S + 30.0)


def serve_artifact(
    options: ServeOptions, *, ray_address: str | None = None, say: Callable[[str], None] = print
) -> None:
    """Serve ``options.model`` until interrupted (SIGTERM's handler or Ctrl-C raises in this
    thread); the requests in flight are answered before it returns or re-raises.

    Without ``ray_address`` a local Ray instance is started (and ``options.port`` must be
    free); with it the application is deployed onto that cluster and removed from it after.
    Raises :class:`~..errors.MissingExtraError` without Ray Serve,
    :class:`~..errors.InputSpecError` for a port in use, :class:`~..errors.ArtifactError`
    for an artifact that does not load.
    """
    _import_serve()
    manifest = read_manifest(options.model)  # a wrong path fails here, before Ray starts
    if not ray_address:
        _check_port_free(options.host, options.port)
    with _deployed(options, ray_address) as url:
        say(f"loading {options.model} ({manifest.kind}) in {options.replicas} replica(s)...")
        _wait_ready(url)
        say(f"serving at {url} (API docs at {url}/docs); SIGTERM or Ctrl-C stops it")
        while True:
            time.sleep(3600)
