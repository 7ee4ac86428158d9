"""The ASGI app: every endpoint, body parsing with precise errors, readiness, metrics and timing headers.

Endpoints
---------
``POST /v1/rerank``, ``POST /v2/rerank``
    Cohere v1/v2 and Jina (see ``shapes.RerankRequest``); response ``shapes.RerankResponse``.
``POST /rerank``
    TEI when the body has ``texts`` (bare-list response ``[{index, score, text?}]``), otherwise the same body
    and response as ``/v1/rerank`` (routehead's original ``/rerank`` body is a subset of it).
``GET /v1/models``
    OpenAI-style list of the one served model.
``GET|HEAD /health``
    Liveness: 200 while the process serves HTTP, with what is served and whether it is ready.
``GET|HEAD /ready``
    Readiness: 200 once the model is loaded and warmed up, 503 while loading, after a failed load and while
    draining.  The rerank endpoints answer 503 (with Retry-After) in the same states.
``GET /metrics``
    Prometheus text format.
``GET /docs``, ``GET /openapi.json``
    Offline documentation and the OpenAPI document (the response models are the real ``response_model``s).

Errors are ``{"error": {"message", "type"}}`` (``service.errors``): 400/408/413/415/422 for the client's
input, 429 ``overloaded`` with Retry-After past ``max_concurrent_requests``, 503 ``not_ready``, 504 ``timeout``
after ``request_timeout_s``, 500 ``internal_error`` for a model failure (the traceback is logged; other
requests of the same batch are retried alone and unaffected).  A 405 carries ``Allow``.

Each re-rank response carries TEI's timing headers ``x-queue-time``, ``x-inference-time``, ``x-total-time``
(milliseconds) and ``x-request-id``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from routehead.calibration import Calibration, calibration_for
from routehead.errors import RouteheadError
from routehead.service.batching import Batcher, Outcome, QueueFull, ShuttingDown, Work
from routehead.service.config import Limits, ServiceSettings
from routehead.service.docs import docs_html
from routehead.service.errors import (
    GENERIC_500,
    HTTP_TYPES,
    ErrorResponse,
    clip,
    error,
    format_validation_errors,
    is_valid_unicode,
    json_type,
)
from routehead.service.http import BodyGuard
from routehead.service.metrics import CONTENT_TYPE, Metrics
from routehead.service.shapes import (
    ModelList,
    RerankRequest,
    RerankResponse,
    Scored,
    TEIRequest,
    TEIResult,
    allowed_fields,
    cohere_results,
    tei_results,
)
from routehead.service.tokens import TokenCounter

logger = logging.getLogger("routehead.service")

WARMUP = Work(query="warm up", documents=["warm up the model"], tokens=64)


class ReadyStatus(BaseModel):
    """Body of ``/ready``: ``status`` is ready, loading, failed or draining."""

    status: str
    ready: bool
    message: str | None = None


class _State:
    """What the endpoints share: the replicas, the batcher, readiness, calibration and metrics."""

    def __init__(self, source: Any, limits: Limits, settings: ServiceSettings, calibration: Calibration | None,
                 names: Sequence[str] | None) -> None:
        self.limits = limits
        self.settings = settings
        self.metrics = Metrics()
        self.names = names
        self.given_calibration = calibration
        self.status = "loading"
        self.message: str | None = None
        self.batcher: Batcher | None = None
        self.info: dict[str, Any] = {}
        self.model_name = "unknown"
        self.calibration: Calibration = calibration or calibration_for({})
        self.counter: TokenCounter | None = None
        self.created = int(time.time())
        self.replicas: list[Any] = []
        self.factory: Callable[[], Any] | None = None
        if _is_reranker(source) or (isinstance(source, (list, tuple)) and source and _is_reranker(source[0])):
            self._set_replicas(list(source) if isinstance(source, (list, tuple)) else [source])
        elif callable(source):
            self.factory = source
        else:
            raise TypeError("create_app needs a reranker, a list of replicas, or a factory returning them")

    def _set_replicas(self, replicas: list[Any]) -> None:
        # info() is read once: /health never waits for the model, and a broken info() fails at start-up.
        self.info = json.loads(json.dumps(dict(replicas[0].info()), default=str))
        self.model_name = _model_name(self.info) or "unknown"
        self.calibration = self.given_calibration or calibration_for(self.info)
        self.counter = TokenCounter(replicas[0])
        self.replicas = replicas
        s = self.settings
        self.batcher = Batcher(replicas, max_batch_tokens=s.max_batch_tokens, max_batch_requests=s.max_batch_requests,
                               max_concurrent_requests=s.max_concurrent_requests, batching=s.batching,
                               metrics=self.metrics, names=self.names)

    @property
    def ready(self) -> bool:
        return self.status == "ready"

    def _mark(self, status: str, message: str | None = None) -> None:
        self.status, self.message = status, message
        self.metrics.ready.set(1 if status == "ready" else 0)
        logger.info("service %s%s", status, f": {message}" if message else "")

    def start_workers(self, done: threading.Event | None = None) -> None:
        assert self.batcher is not None

        def ready() -> None:
            if self.status == "loading":
                self._mark("ready")
            if done is not None:
                done.set()

        def failed(exc: BaseException) -> None:
            self._mark("failed", f"warm-up failed: {type(exc).__name__}: {exc}")
            if done is not None:
                done.set()

        self.batcher.start(warmup=WARMUP if self.settings.warmup else None, on_ready=ready, on_error=failed)

    def load_in_background(self) -> None:
        assert self.factory is not None

        def load() -> None:
            try:
                made = self.factory()  # type: ignore[misc]
                self._set_replicas(list(made) if isinstance(made, (list, tuple)) else [made])
            except BaseException as exc:
                logger.exception("loading the model failed")
                self._mark("failed", f"loading the model failed: {type(exc).__name__}: {exc}")
                return
            self.start_workers()

        threading.Thread(target=load, name="routehead-load", daemon=True).start()

    def drain(self) -> None:
        """Stop admitting work (readiness goes to 503); in-flight requests keep running."""
        if self.status in ("ready", "loading"):
            self._mark("draining")


def _is_reranker(obj: Any) -> bool:
    # A class is a factory (it has a ``rerank`` attribute, but an unbound one).
    return hasattr(obj, "rerank") and not isinstance(obj, type)


def _model_name(info: dict[str, Any]) -> str | None:
    for key in ("model", "model_name", "model_id", "name"):
        value = info.get(key)
        if isinstance(value, str) and value:
            return value
    return None


def _reject_constant(name: str) -> Any:
    """``json.loads`` accepts NaN/Infinity by default; they are not JSON, so refuse them."""
    raise ValueError(f"{name} is not valid JSON")


def _inline_refs(schema: dict[str, Any]) -> dict[str, Any]:
    """Inline pydantic's ``$defs`` so a schema can sit inside the OpenAPI document as is."""
    defs = schema.pop("$defs", {})

    def walk(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/$defs/"):
                return walk(dict(defs[ref.rsplit("/", 1)[1]]))
            return {k: walk(v) for k, v in node.items()}
        if isinstance(node, list):
            return [walk(v) for v in node]
        return node

    return walk(schema)


def _request_body(*models: type[BaseModel]) -> dict[str, Any]:
    schemas = [_inline_refs(m.model_json_schema()) for m in models]
    schema = schemas[0] if len(schemas) == 1 else {"anyOf": schemas}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


async def _until_disconnect(request: Request) -> None:
    """Returns when the client has gone away (after the body, the ASGI server sends only ``http.disconnect``)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def _ms(seconds: float) -> str:
    return str(round(seconds * 1000.0, 3))


def create_app(reranker: Any, limits: Limits | None = None, settings: ServiceSettings | None = None, *,
               calibration: Calibration | None = None, replica_names: Sequence[str] | None = None) -> FastAPI:
    """Build the re-rank service.

    ``reranker`` is a reranker (duck type: ``rerank(query, documents, ...)`` returning an object with
    ``indices``/``scores``, and ``info()``), a list of replicas (one per device, all the same model), or a
    factory returning either: a factory is called in a background thread at start-up, so the HTTP server
    answers ``/health`` (live) and 503 on ``/ready`` while the model loads.  Given replicas, the warm-up runs
    during start-up.  ``calibration`` overrides the lookup of a shipped calibration asset.
    """
    limits = limits or Limits()
    settings = settings or ServiceSettings()
    state = _State(reranker, limits, settings, calibration, replica_names)
    metrics = state.metrics

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
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
                await asyncio.to_thread(state.batcher.close, settings.graceful_shutdown_s)

    app = FastAPI(title="routehead re-rank service", version="0.2.0", lifespan=lifespan, docs_url=None,
                  redoc_url=None,
                  description="Attention-based re-ranking with LLMs behind the APIs re-rank clients already speak: "
                              "Cohere v1/v2 and Jina (/v1/rerank, /v2/rerank), TEI (/rerank with texts).")
    app.add_middleware(BodyGuard, max_bytes=limits.max_request_bytes, timeout_s=settings.body_timeout_s)
    app.state.limits = limits
    app.state.settings = settings
    app.state.service = state
    app.state.reranker = state.replicas[0] if state.replicas else None

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error(exc.status_code, HTTP_TYPES.get(exc.status_code, "http_error"), str(exc.detail),
                     headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
        return error(422, "validation_error", format_validation_errors(exc.errors(), ""))

    @app.exception_handler(Exception)
    async def _unexpected(_request: Request, exc: Exception) -> JSONResponse:
        logger.error("unhandled error", exc_info=exc)
        return error(500, "internal_error", GENERIC_500)

    # -- status endpoints ------------------------------------------------------------------------------------
    @app.head("/health", include_in_schema=False)
    @app.get("/health", summary="Liveness")
    async def health() -> dict[str, Any]:
        """200 while the process serves HTTP; says what is served and whether it is ready."""
        out: dict[str, Any] = {"status": "ok", "ready": state.ready, "state": state.status}
        out.update({k: v for k, v in state.info.items() if k not in out})
        out.setdefault("limits", limits.as_dict())
        out["calibrated"] = state.calibration.calibrated
        out["replicas"] = len(state.replicas)
        return out

    @app.head("/ready", include_in_schema=False)
    @app.get("/ready", summary="Readiness", response_model=ReadyStatus, responses={503: {"model": ReadyStatus}})
    async def ready() -> JSONResponse:
        """200 once the model is loaded and warmed up; 503 while loading, after a failed load, or draining."""
        body = {"status": state.status, "ready": state.ready, "message": state.message}
        headers = None if state.ready else {"Retry-After": str(settings.retry_after_s)}
        return JSONResponse(body, status_code=200 if state.ready else 503, headers=headers)

    @app.get("/metrics", summary="Prometheus metrics", response_class=Response,
             responses={200: {"content": {"text/plain": {}}}})
    async def prometheus() -> Response:
        metrics.in_flight.set(state.batcher.admitted if state.batcher is not None else 0)
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models", summary="Served models (OpenAI-style)", response_model=ModelList)
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": state.model_name, "object": "model", "created": state.created,
                                            "owned_by": "routehead"}]}

    @app.get("/docs", include_in_schema=False)
    async def docs() -> HTMLResponse:
        return HTMLResponse(docs_html(app.openapi()))

    # -- re-rank endpoints -----------------------------------------------------------------------------------
    errors: dict[int | str, dict[str, Any]] = {code: {"model": ErrorResponse}
                                               for code in (400, 408, 413, 415, 422, 429, 500, 503, 504)}

    async def parse(request: Request, tei_allowed: bool) -> tuple[RerankRequest | TEIRequest | None,
                                                                  JSONResponse | None]:
        content_type = request.headers.get("content-type")
        if content_type is not None:
            media = content_type.split(";", 1)[0].strip().lower()
            if not (media == "application/json" or (media.startswith("application/") and media.endswith("+json"))):
                return None, error(415, "unsupported_media_type",
                                   f"Content-Type must be application/json, got {clip(content_type)!r}")
        raw = await request.body()  # already bounded by BodyGuard
        if not raw.strip():
            return None, error(422, "invalid_json", "request body is empty; expected a JSON object")
        try:
            payload = json.loads(raw, parse_constant=_reject_constant)
        except UnicodeDecodeError:
            return None, error(422, "invalid_json", "request body is not valid UTF-8 JSON")
        except json.JSONDecodeError as exc:
            return None, error(422, "invalid_json", f"request body is not valid JSON: {exc.msg} (line {exc.lineno}, "
                               f"column {exc.colno})")
        except (ValueError, RecursionError) as exc:
            reason = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
            return None, error(422, "invalid_json", f"request body is not valid JSON: {reason}")
        if not isinstance(payload, dict):
            return None, error(422, "validation_error", f"request body must be a JSON object, got "
                               f"{json_type(payload)}")
        model: type[RerankRequest] | type[TEIRequest] = (
            TEIRequest if tei_allowed and "texts" in payload and "documents" not in payload else RerankRequest)
        allowed = allowed_fields(model)
        unknown = [k for k in payload if k not in model.model_fields]
        if any(not is_valid_unicode(k) for k in unknown):
            names = ", ".join(repr(clip(k)) for k in unknown[:5])
            return None, error(422, "validation_error", f"unknown field(s) {names} (allowed fields: {allowed})")
        docs = payload.get("texts" if model is TEIRequest else "documents")
        if isinstance(docs, list) and len(docs) > limits.max_documents:
            # checked before validation so a flood of tiny documents costs nothing to refuse
            return None, error(422, "limit_exceeded", f"too many documents: {len(docs)}; the limit is "
                               f"max_documents={limits.max_documents}")
        try:
            return model.model_validate(payload), None
        except ValidationError as exc:
            return None, error(422, "validation_error", format_validation_errors(exc.errors(), allowed))

    async def handle(request: Request, endpoint: str, tei_allowed: bool) -> Response:
        started = time.perf_counter()
        request_id = uuid.uuid4().hex
        outcome_label = "error"
        try:
            response = await _handle(request, started, request_id, tei_allowed)
            outcome_label = "ok" if response.status_code < 400 else str(response.status_code)
            return response
        except asyncio.CancelledError:
            outcome_label = "cancelled"
            raise
        finally:
            metrics.requests.labels(endpoint=endpoint, outcome=outcome_label).inc()
            metrics.total_time.observe(time.perf_counter() - started)

    async def _handle(request: Request, started: float, request_id: str, tei_allowed: bool) -> Response:
        if not state.ready or state.batcher is None or state.counter is None:
            metrics.failures.labels(reason="not_ready").inc()
            return error(503, "not_ready", f"the model is not ready ({state.status})"
                         + (f": {state.message}" if state.message else ""),
                         headers={"Retry-After": str(settings.retry_after_s)})
        req, failure = await parse(request, tei_allowed)
        if failure is not None:
            metrics.failures.labels(reason="invalid_request").inc()
            return failure
        assert req is not None
        tei = isinstance(req, TEIRequest)
        texts = list(req.texts) if tei else req.texts()  # type: ignore[union-attr]
        if len(req.query) > limits.max_query_chars:
            return _limit(f"query has {len(req.query)} characters; the limit is "
                          f"max_query_chars={limits.max_query_chars}")
        for i, text in enumerate(texts):
            if len(text) > limits.max_document_chars:
                return _limit(f"documents[{i}] has {len(text)} characters; the limit is "
                              f"max_document_chars={limits.max_document_chars}")
        counter = state.counter
        warnings: list[str] = []
        max_tokens = None if tei else req.max_tokens_per_doc  # type: ignore[union-attr]
        if max_tokens is not None:
            texts = await asyncio.to_thread(counter.truncate, texts, max_tokens)
        tokens = await asyncio.to_thread(counter.prompt_tokens, req.query, texts)
        if tokens > limits.max_request_tokens:
            return _limit(f"the request is about {tokens} prompt tokens; the limit is "
                          f"max_request_tokens={limits.max_request_tokens} (send fewer or shorter documents)")
        if not tei:
            for name in ("relevant_spans", "max_chunks_per_doc", "priority"):
                if getattr(req, name) is not None:
                    warnings.append(f"{name} is accepted and ignored" + ("; use return_evidence" if
                                                                        name == "relevant_spans" else ""))
        fs = None if tei else req.first_stage_scores  # type: ignore[union-attr]
        work = Work(query=req.query, documents=texts, evidence=req.return_evidence, tokens=tokens,
                    first_stage_scores=None if fs is None else [float(x) for x in fs])
        got = await _run(request, work)
        if isinstance(got, Response):
            return got
        try:
            scored = Scored(got.ranking, len(texts), state.calibration, req.return_evidence)
        except Exception:
            logger.exception("reranker returned a malformed ranking")
            metrics.failures.labels(reason="malformed_ranking").inc()
            return error(500, "internal_error", GENERIC_500)
        if req.return_evidence and scored.evidence is None:
            warnings.append("this reranker gives no evidence; evidence lists are empty")
        metrics.documents.inc(len(texts))
        metrics.queue_time.observe(got.queue_s)
        metrics.inference_time.observe(got.inference_s)
        total = time.perf_counter() - started
        headers = {"x-queue-time": _ms(got.queue_s), "x-inference-time": _ms(got.inference_s),
                   "x-total-time": _ms(total), "x-request-id": request_id,
                   "x-calibrated": "true" if state.calibration.calibrated else "false"}
        logger.info("rerank", extra={"request_id": request_id, "documents": len(texts), "tokens": tokens,
                                     "batch_size": got.batch_size, "queue_ms": round(got.queue_s * 1000, 3),
                                     "inference_ms": round(got.inference_s * 1000, 3),
                                     "total_ms": round(total * 1000, 3), "shape": "tei" if tei else "cohere"})
        if tei:
            items = tei_results(scored, texts, req.raw_scores, req.return_text, bool(req.return_evidence))
            for item in items:
                TEIResult.model_validate(item)
            return JSONResponse(items, headers=headers)
        r: RerankRequest = req  # type: ignore[assignment]
        body: dict[str, Any] = {
            "id": request_id,
            "results": cohere_results(scored, texts, r.top_n, bool(r.return_documents), r.raw_scores,
                                      bool(r.return_evidence)),
            "model": state.model_name,
            "meta": {"api_version": {"version": "2", "is_experimental": False},
                     "billed_units": {"search_units": 1, "input_tokens": tokens}, "tokens": {"input_tokens": tokens},
                     "calibrated": state.calibration.calibrated, "duration_ms": round(total * 1000.0, 3),
                     "queue_ms": round(got.queue_s * 1000.0, 3), "inference_ms": round(got.inference_s * 1000.0, 3),
                     "batch_size": got.batch_size, "n_documents": len(texts)},
            "usage": {"total_tokens": tokens},
        }
        if warnings:
            body["meta"]["warnings"] = warnings
        if r.return_heads:
            body["heads"] = scored.heads
            body["head_weights"] = scored.weights
        RerankResponse.model_validate(body)  # what is sent is what /openapi.json promises
        return JSONResponse(body, headers=headers)

    def _limit(message: str) -> JSONResponse:
        metrics.failures.labels(reason="limit_exceeded").inc()
        return error(422, "limit_exceeded", message)

    async def _run(request: Request, work: Work) -> Outcome | Response:
        """Queue the work; answer 429/503/504/422/500 for what can go wrong, or nothing if the client left."""
        assert state.batcher is not None
        submit = asyncio.ensure_future(state.batcher.submit(work, settings.request_timeout_s))
        watch = asyncio.ensure_future(_until_disconnect(request))
        try:
            await asyncio.wait({submit, watch}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not submit.done():
                submit.cancel()  # the client left (or this handler was cancelled): leave the queue
            watch.cancel()
        if not submit.done() or submit.cancelled():
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await submit
            metrics.failures.labels(reason="client_disconnected").inc()
            return Response(status_code=499)  # nobody reads it; 499 is nginx's "client closed request"
        try:
            return submit.result()
        except QueueFull as exc:
            metrics.failures.labels(reason="queue_full").inc()
            return error(429, "overloaded", f"{exc}; retry later", headers={"Retry-After": str(settings.retry_after_s)})
        except ShuttingDown as exc:
            metrics.failures.labels(reason="shutting_down").inc()
            return error(503, "not_ready", str(exc), headers={"Retry-After": str(settings.retry_after_s)})
        except TimeoutError:
            metrics.failures.labels(reason="timeout").inc()
            return error(504, "timeout", f"no answer within request_timeout_s={settings.request_timeout_s:g} s; "
                         "the request was dropped")
        except RouteheadError as exc:
            metrics.failures.labels(reason="invalid_input").inc()
            return error(422, "invalid_input", str(exc))
        except Exception:
            logger.exception("reranker failed")
            metrics.failures.labels(reason="model_error").inc()
            return error(500, "internal_error", GENERIC_500)

    cohere_doc = dict(response_model=RerankResponse, responses=errors, openapi_extra=_request_body(RerankRequest))

    @app.post("/v1/rerank", summary="Re-rank (Cohere v1, Jina)", **cohere_doc)  # type: ignore[arg-type]
    async def rerank_v1(request: Request) -> Response:
        return await handle(request, "/v1/rerank", tei_allowed=False)

    @app.post("/v2/rerank", summary="Re-rank (Cohere v2)", **cohere_doc)  # type: ignore[arg-type]
    async def rerank_v2(request: Request) -> Response:
        return await handle(request, "/v2/rerank", tei_allowed=False)

    @app.post("/rerank", summary="Re-rank (TEI with texts; otherwise as /v1/rerank)",
              response_model=RerankResponse | list[TEIResult], responses=errors,
              openapi_extra=_request_body(RerankRequest, TEIRequest))
    async def rerank(request: Request) -> Response:
        return await handle(request, "/rerank", tei_allowed=True)

    return app
