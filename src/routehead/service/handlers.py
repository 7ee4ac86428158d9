"""The status endpoints, the error handlers and the app's lifespan: plain functions that read the app's
:class:`~routehead.service.state.ServiceState` (``request.app.state.service``); :func:`~routehead.service.app.
create_app` wires them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from routehead.service.docs import docs_html
from routehead.service.errors import GENERIC_500, HTTP_TYPES, clip, error, format_validation_errors
from routehead.service.metrics import CONTENT_TYPE
from routehead.service.responses import ModelCard, ModelStats
from routehead.service.state import ServiceState

logger = logging.getLogger("routehead.service")


class ReadyStatus(BaseModel):
    """Body of ``/ready``: ``status`` is ready, loading, failed or draining."""

    status: str
    ready: bool
    message: str | None = None


def _state(request: Request) -> ServiceState:
    return request.app.state.service


# -- lifespan -----------------------------------------------------------------------------------------------------
@contextlib.asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Given replicas: warm them up before serving.  Given a factory: load in the background (``/ready`` is 503
    meanwhile).  On shutdown: drain, fail what is queued, let running batches finish (until the draining server's
    ``shutdown_by``, or for ``graceful_shutdown_s``)."""
    state: ServiceState = app.state.service
    if state.batcher is not None:
        done = threading.Event()
        state.start_workers(done)
        await asyncio.to_thread(done.wait, 600)
    else:
        state.load_in_background()
    try:
        yield
    finally:
        state.drain()
        if state.batcher is not None:
            timeout = state.settings.graceful_shutdown_s
            if state.shutdown_by is not None:
                timeout = max(0.0, state.shutdown_by - time.perf_counter())
            await asyncio.to_thread(state.batcher.close, timeout)


# -- error handlers: every error in the one shape ----------------------------------------------------------------
async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    return error(exc.status_code, HTTP_TYPES.get(exc.status_code, "http_error"), str(exc.detail),
                 headers=getattr(exc, "headers", None), path=request.url.path)


async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    return error(422, "validation_error", format_validation_errors(exc.errors(), ""), path=request.url.path)


async def unexpected(request: Request, exc: Exception) -> JSONResponse:
    logger.error("unhandled error", exc_info=exc)
    return error(500, "internal_error", GENERIC_500, path=request.url.path)


# -- status endpoints --------------------------------------------------------------------------------------------
async def health(request: Request) -> dict[str, Any]:
    """200 while the process serves HTTP; says what is served and whether it is ready."""
    state = _state(request)
    out: dict[str, Any] = {"status": "ok", "ready": state.ready, "state": state.status}
    out.update({k: v for k, v in state.info.items() if k not in out})
    out.setdefault("limits", state.limits.as_dict())
    out["calibrated"] = state.calibration.calibrated
    out["replicas"] = len(state.replicas)
    return out


async def ready(request: Request) -> JSONResponse:
    """200 once the model is loaded and warmed up; 503 while loading, after a failed load, or draining."""
    state = _state(request)
    body = {"status": state.status, "ready": state.ready, "message": state.message}
    headers = None if state.ready else {"Retry-After": str(state.settings.retry_after_s)}
    return JSONResponse(body, status_code=200 if state.ready else 503, headers=headers)


async def prometheus(request: Request) -> Response:
    state = _state(request)
    state.metrics.in_flight.set(state.batcher.admitted if state.batcher is not None else 0)
    return Response(state.metrics.render(), media_type=CONTENT_TYPE)


def _card(state: ServiceState, owned_by: str | None) -> dict[str, Any]:
    """The served model: OpenAI's fields, and Infinity's ``stats`` (from the queue), ``backend``, ``capabilities``."""
    batcher, settings = state.batcher, state.settings
    admitted = batcher.admitted if batcher is not None else 0
    stats = ModelStats(queue_fraction=admitted / settings.max_concurrent_requests,
                       queue_absolute=batcher.queued if batcher is not None else 0, results_pending=admitted,
                       batch_size=settings.max_batch_requests if settings.batching else 1)
    return ModelCard(id=state.model_name, created=state.created, owned_by=owned_by,
                     stats=stats).model_dump(exclude_none=True)


async def models(request: Request) -> dict[str, Any]:
    """``GET /v1/models``: OpenAI's list (``owned_by`` routehead) with Infinity's fields."""
    return {"object": "list", "data": [_card(_state(request), "routehead")]}


async def infinity_models(request: Request) -> dict[str, Any]:
    """``GET /models`` (Infinity's path): the same list without ``owned_by``, which Infinity's client admits only
    as its own name."""
    return {"object": "list", "data": [_card(_state(request), None)]}


async def model(request: Request, model_id: str) -> JSONResponse:
    """``GET /v1/models/{id}`` (OpenAI's ``models.retrieve``): the served model, or 404."""
    state = _state(request)
    if model_id != state.model_name:
        return error(404, "not_found", f"the model {clip(model_id)!r} is not served here; this service serves "
                     f"{state.model_name!r} (GET /v1/models)")
    return JSONResponse(_card(state, "routehead"))


async def docs(request: Request) -> HTMLResponse:
    return HTMLResponse(docs_html(request.app.openapi()))
