"""The ASGI app: every endpoint, body parsing with precise errors, readiness, metrics and timing headers.

Endpoints
---------
``POST /v1/rerank``, ``POST /v2/rerank``
    Cohere v1/v2 and Jina (see ``shapes.RerankRequest``); response ``shapes.RerankResponse``.
``POST /rerank``
    TEI when the body has ``texts`` (bare-list response ``[{index, score, text?}]``; other fields ignored, as TEI
    does, and named in ``x-ignored-fields``), otherwise the same body and response as ``/v1/rerank``
    (routehead's original ``/rerank`` body is a subset of it; Infinity's client sends it).
``GET /v1/models``, ``GET /v1/models/{id}``, ``GET /models``
    OpenAI-style list of the one served model (with Infinity's ``stats``), OpenAI's ``models.retrieve``, and
    Infinity's list at its root path.
``GET|HEAD /health``
    Liveness: 200 while the process serves HTTP, with what is served and whether it is ready.
``GET|HEAD /ready``
    Readiness: 200 once the model is loaded and warmed up, 503 while loading, after a failed load and while
    draining.  The rerank endpoints answer 503 (with Retry-After) in the same states.
``GET /metrics``
    Prometheus text format.
``GET /docs``, ``GET /openapi.json``
    Offline documentation and the OpenAPI document (the response models are the real ``response_model``s).

Errors are ``{"error": {"message", "type"}}`` (``service.errors``; on ``/v1/rerank`` and ``/rerank`` also
FastAPI's ``detail``, for Jina's and Infinity's clients): 400/408/413/415/422 for the client's input, 429
``overloaded`` with Retry-After past ``max_concurrent_requests`` or when the queue ahead would keep the request
past ``request_timeout_s`` (estimated from the queued tokens and the measured tokens/s), 503 ``not_ready``
(also while draining after SIGTERM), 504 ``timeout`` after ``request_timeout_s``, 500 ``internal_error`` for a
model failure (the traceback is logged; other requests of the same batch are retried alone and unaffected).
A 405 carries ``Allow``.

Each re-rank response carries TEI's timing headers ``x-queue-time``, ``x-inference-time``, ``x-total-time``
(milliseconds) and ``x-request-id``.

This module only wires the app (text-embeddings-inference style): the handlers are plain functions in
:mod:`~routehead.service.handlers` (status, errors, lifespan) and :mod:`~routehead.service.reranking` (the
re-rank endpoints), reading the shared :class:`~routehead.service.state.ServiceState` from ``app.state.service``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Response
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from routehead.calibration import Calibration
from routehead.service import handlers, reranking
from routehead.service.config import Limits, ServiceSettings
from routehead.service.errors import DetailedErrorResponse, ErrorResponse
from routehead.service.http import BodyGuard
from routehead.service.responses import ModelCard, ModelList, RerankResponse, TEIResult
from routehead.service.schema import request_body
from routehead.service.shapes import RerankRequest, TEIRequest
from routehead.service.state import ServiceState, Source

DESCRIPTION = ("Attention-based re-ranking with LLMs behind the APIs re-rank clients already speak: Cohere v1/v2 and "
               "Jina (/v1/rerank, /v2/rerank), TEI (/rerank with texts), Infinity (/rerank, /models).")
_CODES = (400, 408, 413, 415, 422, 429, 500, 503, 504)
ERRORS: dict[int | str, dict[str, Any]] = {code: {"model": ErrorResponse} for code in _CODES}
DETAILED_ERRORS: dict[int | str, dict[str, Any]] = {code: {"model": DetailedErrorResponse} for code in _CODES}


def _status_routes(app: FastAPI) -> None:
    app.add_api_route("/health", handlers.health, methods=["HEAD"], include_in_schema=False)
    app.add_api_route("/health", handlers.health, methods=["GET"], summary="Liveness")
    app.add_api_route("/ready", handlers.ready, methods=["HEAD"], include_in_schema=False)
    app.add_api_route("/ready", handlers.ready, methods=["GET"], summary="Readiness",
                      response_model=handlers.ReadyStatus, responses={503: {"model": handlers.ReadyStatus}})
    app.add_api_route("/metrics", handlers.prometheus, methods=["GET"], summary="Prometheus metrics",
                      response_class=Response, responses={200: {"content": {"text/plain": {}}}})
    app.add_api_route("/v1/models", handlers.models, methods=["GET"], summary="Served models (OpenAI-style)",
                      response_model=ModelList, response_model_exclude_none=True)
    app.add_api_route("/v1/models/{model_id:path}", handlers.model, methods=["GET"],
                      summary="The served model (OpenAI's models.retrieve)", response_model=ModelCard,
                      response_model_exclude_none=True, responses={404: {"model": ErrorResponse}})
    app.add_api_route("/models", handlers.infinity_models, methods=["GET"], summary="Served models (Infinity)",
                      response_model=ModelList, response_model_exclude_none=True)
    app.add_api_route("/docs", handlers.docs, methods=["GET"], include_in_schema=False)


def _rerank_routes(app: FastAPI, limits: Limits) -> None:
    cohere = request_body(RerankRequest, limits=limits)
    app.add_api_route("/v1/rerank", reranking.rerank_v1, methods=["POST"], summary="Re-rank (Cohere v1, Jina)",
                      response_model=RerankResponse, responses=DETAILED_ERRORS, openapi_extra=cohere)
    app.add_api_route("/v2/rerank", reranking.rerank_v2, methods=["POST"], summary="Re-rank (Cohere v2)",
                      response_model=RerankResponse, responses=ERRORS, openapi_extra=cohere)
    app.add_api_route("/rerank", reranking.rerank, methods=["POST"],
                      summary="Re-rank (TEI with texts; otherwise as /v1/rerank: Infinity, routehead)",
                      response_model=RerankResponse | list[TEIResult], responses=DETAILED_ERRORS,
                      openapi_extra=request_body(RerankRequest, TEIRequest, limits=limits))


def create_app(reranker: Source, limits: Limits | None = None, settings: ServiceSettings | None = None, *,
               calibration: Calibration | None = None, replica_names: Sequence[str] | None = None) -> FastAPI:
    """Build the re-rank service.

    ``reranker`` is a reranker (:class:`~routehead.service.protocol.RerankerLike`: ``rerank``, ``rerank_many``,
    ``info`` and ``prompt_tokens``, as :class:`routehead.Reranker` has), a list of replicas (one per device, all
    the same model), or a factory returning either: a factory is called in a background thread at start-up, so
    the HTTP server answers ``/health`` (live) and 503 on ``/ready`` while the model loads.  Given replicas, the
    warm-up runs during start-up.  ``calibration`` overrides the lookup of a shipped calibration asset.
    """
    limits = limits or Limits()
    settings = settings or ServiceSettings()
    state = ServiceState(reranker, limits, settings, calibration, replica_names)
    app = FastAPI(title="routehead re-rank service", version="0.2.0", lifespan=handlers.lifespan, docs_url=None,
                  redoc_url=None, description=DESCRIPTION)
    app.add_middleware(BodyGuard, max_bytes=limits.max_request_bytes, timeout_s=settings.body_timeout_s)
    app.state.limits = limits
    app.state.settings = settings
    app.state.service = state
    app.state.reranker = state.replicas[0] if state.replicas else None
    app.add_exception_handler(StarletteHTTPException, handlers.http_error)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, handlers.validation_error)  # type: ignore[arg-type]
    app.add_exception_handler(Exception, handlers.unexpected)
    _status_routes(app)
    _rerank_routes(app, limits)
    return app
