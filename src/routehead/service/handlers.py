"""The status endpoints, the error handlers and the app's lifespan: plain functions that read the app's
:class:`~routehead.service.state.ServiceState` (``request.app.state.service``); :func:`~routehead.service.app.
create_app` wires them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from routehead.service.docs import docs_html
from routehead.service.errors import GENERIC_500, HTTP_TYPES, error, format_validation_errors
from routehead.service.metrics import CONTENT_TYPE
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
    meanwhile).  On shutdown: drain, fail what is queued, let running batches finish."""
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
            await asyncio.to_thread(state.batcher.close, state.settings.graceful_shutdown_s)


# -- error handlers: every error in the one shape ----------------------------------------------------------------
async def http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
    return error(exc.status_code, HTTP_TYPES.get(exc.status_code, "http_error"), str(exc.detail),
                 headers=getattr(exc, "headers", None))


async def validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
    return error(422, "validation_error", format_validation_errors(exc.errors(), ""))


async def unexpected(_request: Request, exc: Exception) -> JSONResponse:
    logger.error("unhandled error", exc_info=exc)
    return error(500, "internal_error", GENERIC_500)


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


async def models(request: Request) -> dict[str, Any]:
    state = _state(request)
    return {"object": "list", "data": [{"id": state.model_name, "object": "model", "created": state.created,
                                        "owned_by": "routehead"}]}


async def docs(request: Request) -> HTMLResponse:
    return HTMLResponse(docs_html(request.app.openapi()))
