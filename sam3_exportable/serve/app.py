"""The Ray Serve application: a FastAPI ingress (:class:`Sam3Ingress`, :data:`api`, OpenAPI
at ``/docs``) in front of the model deployment (:class:`.model.Sam3Model`).

Routes: ``POST /v1/segment`` (the contract is :mod:`.protocol`'s), ``GET /v1/model`` (the
manifest's summary and a replica's settings), ``GET /healthz`` (the ingress is up),
``GET /readyz`` (200 once a model replica has loaded its artifact; 503 before, or naming
why it failed). The ingress checks the key and the body's size and forwards the body; a
model replica that dies mid-request is answered here, in JSON (503, ``Retry-After``),
while Ray Serve starts another.

:func:`build_app` returns the application for ``serve.run``; :func:`app_builder` is the
same for a Serve config file (``import_path: sam3_exportable.serve.app:app_builder``, the
:class:`.options.ServeOptions` fields as ``args``).
"""

import hashlib
import hmac
import logging
from importlib.metadata import version
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from ray import serve
from ray.exceptions import ActorUnavailableError, RayActorError

from .model import Sam3Model
from .options import ServeOptions
from .protocol import RequestError
from .schema import ERROR_RESPONSES, SEGMENT_REQUEST_BODY, ModelAnswer, SegmentAnswer

__all__ = ["DRAIN_TIMEOUT_S", "Sam3Ingress", "api", "app_builder", "build_app"]

_log = logging.getLogger(__name__)

#: Seconds a replica being stopped waits for its requests in flight (Ray Serve's
#: ``graceful_shutdown_timeout_s``): a full-size graph call on a small CPU takes a minute.
DRAIN_TIMEOUT_S = 180.0

#: Ray's exceptions for a model replica that died or cannot be reached mid-request.
_REPLICA_LOST = (RayActorError, ActorUnavailableError)

api = FastAPI(
    title="sam3-exportable",
    version=version("sam3-exportable"),
    description="SAM3 concept segmentation (image + phrases and/or exemplar boxes -> instances) "
    "served from an exported artifact; concurrent requests share graph calls.",
)


@api.exception_handler(RequestError)
async def _refused(request: Request, exc: RequestError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


@api.exception_handler(Exception)
async def _failed(request: Request, exc: Exception) -> JSONResponse:
    _log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
    body = RequestError(500, "server", f"internal error: {type(exc).__name__}: {exc}").body()
    return JSONResponse(body, status_code=500)


# Defined before the deployment: Ray Serve serializes the ingress class as it is decorated.
async def _read_limited(request: Request, limit: int) -> bytes:
    """The body, refused with 413 past ``limit`` bytes (by its declared length before any
    byte is read, else while it streams in)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise RequestError(413, "body", f"expected at most {limit:,} bytes, got {int(declared):,}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestError(413, "body", f"expected at most {limit:,} bytes, got more")
        chunks.append(chunk)
    return b"".join(chunks)


async def _relay(call: Any) -> JSONResponse:
    """A model method's :data:`.model.Reply` as the answer; a replica lost mid-call as 503."""
    try:
        status, body, headers = await call
    except _REPLICA_LOST as exc:
        _log.warning("a model replica was lost mid-request: %s", type(exc).__name__)
        lost = RequestError(
            503,
            "server",
            "the model replica serving this request stopped; it is being restarted, retry",
            {"Retry-After": "10"},
        )
        return JSONResponse(lost.body(), lost.status, lost.headers)
    return JSONResponse(body, status, headers)


@serve.deployment
@serve.ingress(api)
class Sam3Ingress:
    """The HTTP side: checks the key and the body's size, forwards to the model deployment."""

    def __init__(self, model: Any, options: dict[str, Any]) -> None:
        self.model = model
        self.options = ServeOptions(**options)

    def _authorize(self, request: Request) -> None:
        expected = self.options.api_key_sha256
        if expected is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        given = hashlib.sha256(token.strip().encode("utf-8")).hexdigest()
        if not (hmac.compare_digest(given, expected) and scheme.lower() == "bearer"):
            raise RequestError(
                401,
                "authorization",
                "expected 'Authorization: Bearer <key>' with the server's key",
                {"WWW-Authenticate": "Bearer"},
            )

    @api.get("/healthz", summary="the server is up")
    async def healthz(self) -> dict[str, str]:
        return {"status": "ok"}

    @api.get("/readyz", summary="200 once a model replica has loaded the artifact", responses=ERROR_RESPONSES)
    async def readyz(self) -> JSONResponse:
        try:
            state = await self.model.status.remote()
        except _REPLICA_LOST:
            state = {"status": "loading", "error": None}
        if state["status"] == "ready":
            return JSONResponse({"status": "ready"})
        return JSONResponse(state, 503, {"Retry-After": "5"})

    @api.get("/v1/model", summary="the artifact's manifest summary", response_model=ModelAnswer)
    async def model_info(self, request: Request) -> JSONResponse:
        self._authorize(request)
        return await _relay(self.model.info.remote())

    @api.post(
        "/v1/segment",
        summary="segment one image by phrases and/or exemplar boxes",
        openapi_extra={"requestBody": SEGMENT_REQUEST_BODY},
        responses={200: {"model": SegmentAnswer}, **ERROR_RESPONSES},
    )
    async def segment(self, request: Request) -> JSONResponse:
        self._authorize(request)
        body = await _read_limited(request, self.options.max_body_bytes)
        return await _relay(self.model.segment.remote(request.headers.get("content-type", ""), body))


def build_app(options: ServeOptions) -> serve.Application:
    """The Ray Serve application of ``options`` (``serve.run(build_app(...))``): the
    ingress and ``options.replicas`` model replicas, each reserving ``options.threads`` CPUs
    and taking a batch and the queue at once (:attr:`.options.ServeOptions.max_ongoing`)."""
    fields = options.to_json()
    model = Sam3Model.options(
        num_replicas=options.replicas,
        max_ongoing_requests=options.max_ongoing,
        ray_actor_options={"num_cpus": options.threads},
        graceful_shutdown_timeout_s=DRAIN_TIMEOUT_S,
    ).bind(fields)
    return Sam3Ingress.options(
        max_ongoing_requests=options.max_ongoing * options.replicas,
        ray_actor_options={"num_cpus": 0},
        graceful_shutdown_timeout_s=DRAIN_TIMEOUT_S,
    ).bind(model, fields)


def app_builder(args: dict[str, Any]) -> serve.Application:
    """:func:`build_app` for a Serve config file's ``args`` (the option fields by name; an
    ``api_key_file`` is read into its hash). Raises :class:`~..errors.InputSpecError`."""
    from .options import read_api_key

    fields = dict(args)
    key_file = fields.pop("api_key_file", None)
    if key_file:
        fields["api_key_sha256"] = read_api_key(key_file)
    return build_app(ServeOptions(**fields))
