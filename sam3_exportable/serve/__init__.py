"""An online endpoint on Ray Serve: ``sam3-exportable serve`` (:func:`.server.serve_artifact`),
concurrent requests packed into shared graph calls.

* :mod:`.options`: :class:`ServeOptions`, a deployment's settings;
* :mod:`.protocol`: the request contract of ``POST /v1/segment`` and its errors;
* :mod:`.segmenter`: one replica's artifact and the packing of requests into graph calls;
* :mod:`.model`: the model deployment (replicas of a segmenter, Ray Serve's batching, the
  queue limit);
* :mod:`.app`: the FastAPI ingress in front of it (:func:`.app.build_app` for your own
  ``serve.run``, :func:`.app.app_builder` for a Serve config file); :mod:`.schema`: the
  answers' models for the OpenAPI document;
* :mod:`.server`: the command's local Ray instance, readiness and shutdown;
* :mod:`.loadtest`: concurrent HTTP clients against a running server.

Importing this package imports neither Ray nor FastAPI (only :mod:`.app`, :mod:`.model`
and :mod:`.server` do), and no module here imports torch: replicas of an ONNX artifact run
without it.
"""

from __future__ import annotations

from .options import ServeOptions, read_api_key

__all__ = ["ServeOptions", "build_app", "read_api_key"]


def build_app(options: ServeOptions):  # type: ignore[no-untyped-def]
    """The Ray Serve application of ``options`` (:func:`.app.build_app`)."""
    from .app import build_app as build

    return build(options)
