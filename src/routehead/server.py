"""HTTP re-rank service: a Cohere/Jina/TEI-style ``POST /rerank`` in front of a routehead reranker.

Public API
----------
``Limits``
    Request limits (documents per request, characters per document/query, bytes per body).
``create_app(reranker, limits=None) -> FastAPI``
    Builds the ASGI app around a duck-typed reranker (``rerank(query, documents, routed_heads=...)``
    returning an object with ``indices``/``scores``/``heads``, and ``info() -> dict``).
``serve(reranker_factory_or_reranker, host="127.0.0.1", port=8000, limits=None)``
    Builds the reranker (if given a factory), then runs the app with uvicorn.

Endpoints
---------
``POST /rerank``
    Body (JSON object, ``Content-Type: application/json``; unknown fields are rejected)::

        {"query": str,                       # required, not empty/whitespace-only
         "documents": [str | {"text": str}], # required, at least one; objects take only "text"
         "top_n": int >= 1,                  # optional, default: all documents
         "return_documents": bool,           # optional, default false
         "return_heads": bool,               # optional, default false: ask for the routed heads
         "model": str}                       # optional; must equal the loaded model's name

    Response (200)::

        {"results": [{"index": int, "relevance_score": float,
                      "document": {"text": str}}, ...],   # "document" only with return_documents
         "model": str,
         "heads": [[layer, head], ...] | null,            # only with return_heads
         "meta": {"duration_ms": float, "n_documents": int}}

    ``results`` are best first and cut to ``top_n`` (a ``top_n`` larger than the number of documents
    returns them all).  ``duration_ms`` is the wall time spent handling the request, including the time
    spent waiting for the model, which serves one request at a time.

``GET /health``
    ``{"status": "ok", **reranker.info(), "limits": {...}}``.  It never touches the model (``info()`` is
    read once, when the app is built), so it answers while a re-rank is running.

Errors
------
Every error, including validation errors, 404s and 405s, has one shape::

    {"error": {"message": str, "type": str}}

``message`` is meant for a human: it names the field, the offending index and the limit that was hit.
``type`` is a stable machine-readable tag:

=====  ==========================  ==========================================================
code   type                        when
=====  ==========================  ==========================================================
413    ``payload_too_large``       body over ``max_request_bytes`` (by Content-Length, or by the
                                   bytes actually received for chunked bodies); checked before
                                   any parsing
415    ``unsupported_media_type``  a Content-Type other than ``application/json`` (or
                                   ``*+json``); a missing Content-Type is accepted
422    ``invalid_json``            body is not valid UTF-8 JSON (NaN/Infinity are rejected too)
422    ``validation_error``        wrong types, missing/unknown fields, empty query, no
                                   documents, ``top_n < 1``, invalid Unicode (lone surrogates)
422    ``limit_exceeded``          more than ``max_documents`` documents, a document over
                                   ``max_document_chars`` or a query over ``max_query_chars``
                                   (all are 422, not 413: the body was acceptable as bytes, its
                                   content is what breaks a documented limit)
422    ``model_mismatch``          ``model`` given and not the loaded model's name
422    ``invalid_input``           the reranker raised ``RouteheadError`` (e.g. a document that
                                   cannot fit the model's context); message is the error's
500    ``internal_error``          anything else; the message is generic, the traceback is
                                   logged, and the service keeps serving
404    ``not_found``, 405 ``method_not_allowed``, other codes ``http_error``
=====  ==========================  ==========================================================

Concurrency
-----------
The reranker wraps a PyTorch model and is not thread-safe.  Every model call runs on one dedicated
worker thread (a single-thread executor) *and* under a lock: the executor keeps the event loop free
(so ``/health`` and request parsing stay responsive) and makes waiting requests queue without each
holding a thread; the lock keeps the guarantee even if someone calls the reranker from elsewhere
through the same app.  One app per reranker object: two apps sharing one reranker do not share a lock.

Security
--------
There is no authentication, so ``serve`` binds to 127.0.0.1 by default and logs a warning for any
other address.  Body size and content limits bound the memory and compute a single request can ask for.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import math
import operator
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Annotated, Any, Protocol

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    StrictStr,
    ValidationError,
    field_validator,
)
from pydantic_core import PydanticCustomError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from routehead.errors import RouteheadError

__all__ = ["Limits", "create_app", "serve"]

logger = logging.getLogger("routehead.server")

_GENERIC_500 = "Internal server error while re-ranking; see the server log for details."


# --------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Limits:
    """Per-request limits; they bound the memory and model time one request can ask for.

    ``max_request_bytes`` is enforced on raw bytes before parsing (413).  The other limits are enforced
    after parsing, on the decoded content (422, type ``limit_exceeded``); characters are Unicode code
    points (``len(str)``), not tokens, so they are cheap to check before touching the tokenizer.
    """

    max_documents: int = 1000
    max_document_chars: int = 20000
    max_query_chars: int = 4000
    max_request_bytes: int = 5_000_000

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"Limits.{name} must be a positive integer, got {value!r}")


class _Ranking(Protocol):
    indices: Sequence[int]
    scores: Sequence[float]
    heads: Sequence[tuple[int, int]] | None


class _Reranker(Protocol):
    def rerank(self, query: str, documents: list[str], routed_heads: bool = False) -> _Ranking: ...

    def info(self) -> dict[str, Any]: ...


# --------------------------------------------------------------------------------------------------
# Request / response schemas
# --------------------------------------------------------------------------------------------------


def _json_type(value: object) -> str:
    """Name a decoded JSON value's type the way a client wrote it (not the Python type)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def _is_valid_unicode(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _check_unicode(text: str) -> None:
    """Reject lone surrogates (legal in JSON ``\\ud800`` escapes, not in UTF-8).

    They would otherwise crash the tokenizer or the UTF-8 response encoder and surface as a 500.
    """
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise PydanticCustomError(
            "invalid_unicode",
            "contains invalid Unicode (a lone surrogate at character {pos})",
            {"pos": exc.start},
        ) from None


def _check_document(value: object) -> object:
    """Validate one document before the schema's union does, to give one clear message per bad item.

    Pydantic's own message for a failed ``str | object`` union lists one error per branch, which reads
    badly; this validator knows what was meant and says it once.
    """
    if isinstance(value, str):
        _check_unicode(value)
        return value
    if isinstance(value, dict):
        if "text" not in value:
            raise PydanticCustomError(
                "document_text_missing", 'object has no "text" field (expected {"text": "..."})'
            )
        extra = sorted(str(k) for k in value if k != "text")
        if extra:
            raise PydanticCustomError(
                "document_extra_field",
                'object has unknown field(s) {fields}; only "text" is allowed',
                {"fields": ", ".join(repr(_clip(k)) for k in extra[:5])},
            )
        text = value["text"]
        if not isinstance(text, str):
            raise PydanticCustomError(
                "document_text_type", '"text" must be a string, got {got}', {"got": _json_type(text)}
            )
        _check_unicode(text)
        return value
    raise PydanticCustomError(
        "document_type",
        'must be a string or an object {"text": "..."}, got {got}',
        {"got": _json_type(value)},
    )


class DocumentObject(BaseModel):
    """A document given as an object; only ``text`` is accepted so typos are not silently ignored."""

    model_config = ConfigDict(extra="forbid")

    text: StrictStr


_Document = Annotated[StrictStr | DocumentObject, BeforeValidator(_check_document)]


class RerankRequest(BaseModel):
    """Body of ``POST /rerank``.  Strict types: ``"3"`` is not a ``top_n`` and ``"true"`` is not a bool."""

    model_config = ConfigDict(extra="forbid")

    query: StrictStr = Field(description="The search query; must contain a non-whitespace character.")
    documents: list[_Document] = Field(
        min_length=1, description='Documents to re-rank: strings or objects {"text": "..."}.'
    )
    top_n: Annotated[StrictInt, Field(ge=1)] | None = Field(
        default=None, description="Return only the best top_n results (default: all)."
    )
    return_documents: StrictBool = Field(default=False, description="Echo each result's document text.")
    return_heads: StrictBool = Field(
        default=False, description="Ask for, and return, the (layer, head) pairs routed for this query."
    )
    model: StrictStr | None = Field(
        default=None, description="Optional; if given it must equal the served model's name."
    )

    @field_validator("query")
    @classmethod
    def _query_not_blank(cls, value: str) -> str:
        if not value.strip():
            raise PydanticCustomError("empty_query", "must not be empty or whitespace-only")
        _check_unicode(value)
        return value


class ResultDocument(BaseModel):
    """The document echoed back with ``return_documents``."""

    text: str


class RerankResult(BaseModel):
    """One ranked document: its position in the request's ``documents`` and its score."""

    index: int
    relevance_score: float
    document: ResultDocument | None = Field(default=None, description="Only with return_documents.")


class RerankMeta(BaseModel):
    """Timing and size of the request, for clients' own monitoring."""

    duration_ms: float
    n_documents: int


class RerankResponse(BaseModel):
    """Body of a successful ``POST /rerank`` (documentation only; responses are built as dicts)."""

    results: list[RerankResult]
    model: str
    heads: list[tuple[int, int]] | None = Field(default=None, description="Only with return_heads.")
    meta: RerankMeta


class ErrorDetail(BaseModel):
    """What went wrong (``message``, for humans) and a stable tag (``type``, for code)."""

    message: str
    type: str


class ErrorResponse(BaseModel):
    """The single error shape of every non-2xx response."""

    error: ErrorDetail


_ALLOWED_FIELDS = ", ".join(RerankRequest.model_fields)


def _clip(text: str, limit: int = 60) -> str:
    """Shorten client-controlled strings before echoing them in an error message."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _inline_refs(schema: dict[str, Any]) -> dict[str, Any]:
    """Inline pydantic's ``$defs`` so the schema can sit inside the OpenAPI document as is."""
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


# --------------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------------


def _error(status: int, type_: str, message: str) -> JSONResponse:
    """The one error shape.  Messages may quote client input (field names), which may hold lone
    surrogates; those are escaped so building the error can never itself fail with a 500."""
    message = message.encode("utf-8", "backslashreplace").decode("utf-8")
    return JSONResponse({"error": {"message": message, "type": type_}}, status_code=status)


def _format_loc(loc: Sequence[int | str]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + _clip(str(part))
    return out


def _format_validation_errors(errors: Sequence[Any]) -> str:
    """One readable line per error (at most five): ``documents[3]: document must be a string...``."""
    parts = []
    for err in errors[:5]:
        loc = [p for p in err.get("loc", ()) if p != "body"]
        where = _format_loc(loc)
        if err.get("type") == "extra_forbidden":
            parts.append(f"unknown field {where!r} (allowed fields: {_ALLOWED_FIELDS})")
        elif err.get("type") == "too_short" and loc == ["documents"]:
            parts.append("documents: must contain at least one document")
        elif err.get("type") == "missing":
            parts.append(f"{where}: field required" if where else "field required")
        else:
            parts.append(f"{where}: {err.get('msg')}" if where else str(err.get("msg")))
    if len(errors) > 5:
        parts.append(f"... and {len(errors) - 5} more error(s)")
    return "; ".join(parts)


_HTTP_TYPES = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}


# --------------------------------------------------------------------------------------------------
# Body size limit (raw bytes, before any parsing)
# --------------------------------------------------------------------------------------------------


class _BodySizeLimitMiddleware:
    """Reject bodies over ``max_bytes`` with 413 before the app reads or parses anything.

    A declared Content-Length over the limit is refused without reading the body.  Otherwise (including
    chunked uploads, which declare nothing) the body is read and counted as it arrives and refused as soon
    as it passes the limit, so memory stays bounded by the limit.  The accepted body is then replayed to
    the app.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def _reject(self, send: Send, status: int, type_: str, message: str) -> None:
        body = json.dumps({"error": {"message": message, "type": type_}}).encode()
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"connection", b"close"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared: int | None = None
        for name, value in scope.get("headers", ()):
            if name.lower() == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    await self._reject(send, 400, "http_error", "invalid Content-Length header")
                    return
        if declared is not None and declared > self.max_bytes:
            await self._reject(
                send,
                413,
                "payload_too_large",
                f"request body is {declared} bytes (Content-Length); the limit is "
                f"max_request_bytes={self.max_bytes}",
            )
            return

        chunks: list[bytes] = []
        total = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # the client went away; nobody to answer
            chunk = message.get("body", b"")
            total += len(chunk)
            if total > self.max_bytes:
                await self._reject(
                    send,
                    413,
                    "payload_too_large",
                    f"request body exceeds max_request_bytes={self.max_bytes} "
                    f"(received {total} bytes so far)",
                )
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break

        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


# --------------------------------------------------------------------------------------------------
# Model worker: one thread, one call at a time
# --------------------------------------------------------------------------------------------------


class _ModelWorker:
    """Runs every reranker call on one dedicated thread, under a lock.

    A single-thread executor rather than the shared thread pool: queued requests wait as futures instead
    of each parking a pool thread on the lock, a request whose task is cancelled before its turn never
    reaches the model, and PyTorch always sees the same thread.
    """

    def __init__(self, reranker: _Reranker) -> None:
        self._reranker = reranker
        self._lock = threading.Lock()
        self._guard = threading.Lock()
        self._executor: ThreadPoolExecutor | None = None

    def _get_executor(self) -> ThreadPoolExecutor:
        # Created lazily so an app can be served, shut down, and served again (e.g. several TestClients).
        with self._guard:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="routehead-model")
            return self._executor

    def _call(self, query: str, documents: list[str], routed_heads: bool) -> _Ranking:
        with self._lock:
            return self._reranker.rerank(query, documents, routed_heads=routed_heads)

    async def rerank(self, query: str, documents: list[str], routed_heads: bool) -> _Ranking:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._get_executor(), self._call, query, documents, routed_heads)

    def close(self) -> None:
        with self._guard:
            if self._executor is not None:
                self._executor.shutdown(wait=False, cancel_futures=True)
                self._executor = None


# --------------------------------------------------------------------------------------------------
# App
# --------------------------------------------------------------------------------------------------


def _model_name(info: dict[str, Any]) -> str | None:
    for key in ("model", "model_name", "model_id", "name"):
        value = info.get(key)
        if isinstance(value, str) and value:
            return value
    return None


def _to_results(
    ranking: _Ranking, texts: list[str], top_n: int | None, return_documents: bool
) -> list[dict[str, Any]]:
    """Convert and check the reranker's output; a malformed ranking is a server bug (500), not the client's.

    ``operator.index`` accepts Python/NumPy/PyTorch integers but refuses floats, so a float index cannot
    be silently truncated into a wrong document.
    """
    indices = [operator.index(i) for i in ranking.indices]
    scores = [float(s) for s in ranking.scores]
    n = len(texts)
    if len(indices) != len(scores):
        raise ValueError(f"reranker returned {len(indices)} indices but {len(scores)} scores")
    if len(set(indices)) != len(indices) or any(not 0 <= i < n for i in indices):
        raise ValueError(f"reranker returned indices that are not distinct positions in 0..{n - 1}")
    if not all(math.isfinite(s) for s in scores):
        raise ValueError("reranker returned a non-finite score")
    keep = len(indices) if top_n is None else min(top_n, len(indices))
    results: list[dict[str, Any]] = []
    for i, s in zip(indices[:keep], scores[:keep]):
        item: dict[str, Any] = {"index": i, "relevance_score": s}
        if return_documents:
            item["document"] = {"text": texts[i]}
        results.append(item)
    return results


def create_app(reranker: _Reranker, limits: Limits | None = None) -> FastAPI:
    """Build the re-rank service around ``reranker`` (see the module docstring for the HTTP contract).

    ``reranker.info()`` is called once, here: ``/health`` then never waits for the model, and a reranker
    whose ``info()`` fails is caught at start-up rather than on the first health check.  Values that are
    not JSON (paths, dtypes) are turned into strings.
    """
    limits = limits or Limits()
    info: dict[str, Any] = json.loads(json.dumps(dict(reranker.info()), default=str))
    model_name = _model_name(info)
    worker = _ModelWorker(reranker)

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        yield
        worker.close()

    app = FastAPI(
        title="routehead re-rank service",
        description="Attention-based re-ranking with LLMs (Cohere/Jina-style /rerank).",
        lifespan=lifespan,
    )
    app.add_middleware(_BodySizeLimitMiddleware, max_bytes=limits.max_request_bytes)
    app.state.limits = limits
    app.state.reranker = reranker

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error(exc.status_code, _HTTP_TYPES.get(exc.status_code, "http_error"), str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
        return _error(422, "validation_error", _format_validation_errors(exc.errors()))

    @app.exception_handler(Exception)
    async def _unexpected(_request: Request, exc: Exception) -> JSONResponse:
        logger.error("unhandled error", exc_info=exc)
        return _error(500, "internal_error", _GENERIC_500)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        """Liveness plus what is being served; answered without touching the model."""
        out: dict[str, Any] = {"status": "ok"}
        out.update({k: v for k, v in info.items() if k != "status"})
        out.setdefault("limits", asdict(limits))
        return out

    error_responses: dict[int | str, dict[str, Any]] = {
        code: {"model": ErrorResponse} for code in (413, 415, 422, 500)
    }

    @app.post(
        "/rerank",
        response_model=None,
        responses={200: {"model": RerankResponse}, **error_responses},
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": _inline_refs(RerankRequest.model_json_schema())}},
            }
        },
    )
    async def rerank(request: Request) -> JSONResponse:
        """Re-rank ``documents`` for ``query``.

        The body is parsed here rather than by FastAPI so that every failure (bad JSON, bad types,
        limits) gets the same error shape and a precise message.
        """
        started = time.perf_counter()
        content_type = request.headers.get("content-type")
        if content_type is not None:
            media = content_type.split(";", 1)[0].strip().lower()
            is_json = media == "application/json" or (
                media.startswith("application/") and media.endswith("+json")
            )
            if not is_json:
                # Also keeps browsers' "simple" cross-origin POSTs (text/plain, forms) away from the model.
                return _error(
                    415,
                    "unsupported_media_type",
                    f"Content-Type must be application/json, got {_clip(content_type)!r}",
                )
        raw = await request.body()  # already bounded by _BodySizeLimitMiddleware
        if not raw.strip():
            return _error(422, "invalid_json", "request body is empty; expected a JSON object")

        try:
            payload = json.loads(raw, parse_constant=_reject_constant)
        except UnicodeDecodeError:
            return _error(422, "invalid_json", "request body is not valid UTF-8 JSON")
        except json.JSONDecodeError as exc:
            return _error(
                422,
                "invalid_json",
                f"request body is not valid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})",
            )
        except (ValueError, RecursionError) as exc:
            reason = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
            return _error(422, "invalid_json", f"request body is not valid JSON: {reason}")
        if not isinstance(payload, dict):
            return _error(
                422, "validation_error", f"request body must be a JSON object, got {_json_type(payload)}"
            )

        unknown = [k for k in payload if k not in RerankRequest.model_fields]
        if any(not _is_valid_unicode(k) for k in unknown):
            # Pydantic cannot even name such a key; say what it is ourselves.
            names = ", ".join(repr(_clip(k)) for k in unknown[:5])
            return _error(
                422, "validation_error", f"unknown field(s) {names} (allowed fields: {_ALLOWED_FIELDS})"
            )
        documents = payload.get("documents")
        if isinstance(documents, list) and len(documents) > limits.max_documents:
            # Checked before validation so a flood of tiny documents costs nothing to refuse.
            return _error(
                422,
                "limit_exceeded",
                f"too many documents: {len(documents)}; the limit is max_documents={limits.max_documents}",
            )
        try:
            req = RerankRequest.model_validate(payload)
        except ValidationError as exc:
            return _error(422, "validation_error", _format_validation_errors(exc.errors()))

        texts = [d if isinstance(d, str) else d.text for d in req.documents]
        if len(req.query) > limits.max_query_chars:
            return _error(
                422,
                "limit_exceeded",
                f"query has {len(req.query)} characters; the limit is max_query_chars={limits.max_query_chars}",
            )
        for i, text in enumerate(texts):
            if len(text) > limits.max_document_chars:
                return _error(
                    422,
                    "limit_exceeded",
                    f"documents[{i}] has {len(text)} characters; the limit is "
                    f"max_document_chars={limits.max_document_chars}",
                )
        if req.model is not None and model_name is not None and req.model != model_name:
            return _error(
                422,
                "model_mismatch",
                f"this server serves model {model_name!r}, not {_clip(req.model)!r}; "
                "omit 'model' or set it to the served name",
            )

        try:
            ranking = await worker.rerank(req.query, texts, req.return_heads)
        except RouteheadError as exc:
            return _error(422, "invalid_input", str(exc))
        except Exception:
            logger.exception("reranker failed")
            return _error(500, "internal_error", _GENERIC_500)

        try:
            results = _to_results(ranking, texts, req.top_n, req.return_documents)
            heads = None
            if req.return_heads and ranking.heads is not None:
                heads = [[operator.index(layer), operator.index(head)] for layer, head in ranking.heads]
        except Exception:
            logger.exception("reranker returned a malformed ranking")
            return _error(500, "internal_error", _GENERIC_500)

        body: dict[str, Any] = {"results": results, "model": model_name or "unknown"}
        if req.return_heads:
            body["heads"] = heads
        body["meta"] = {
            "duration_ms": round((time.perf_counter() - started) * 1000.0, 3),
            "n_documents": len(texts),
        }
        return JSONResponse(body)

    return app


def _reject_constant(name: str) -> Any:
    """``json.loads`` accepts NaN/Infinity by default; they are not JSON, so refuse them."""
    raise ValueError(f"{name} is not valid JSON")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(
    reranker_factory_or_reranker: _Reranker | Callable[[], _Reranker],
    host: str = "127.0.0.1",
    port: int = 8000,
    limits: Limits | None = None,
    *,
    log_level: str = "info",
) -> None:
    """Load the reranker (calling it first if it is a factory), then serve it with uvicorn until stopped.

    The model loads before the socket opens, so a ``/health`` that answers means a model that is ready.
    Binds to 127.0.0.1 by default: the service has no authentication, and a model on a public port is an
    open compute endpoint.  Other addresses work but are logged as a warning.
    """
    import uvicorn  # imported here: create_app users (tests, embedding in another ASGI app) do not need it

    obj = reranker_factory_or_reranker
    # A class is a factory too (it has a ``rerank`` attribute, but an unbound one).
    is_instance = hasattr(obj, "rerank") and not isinstance(obj, type)
    reranker = obj if is_instance else obj()  # type: ignore[operator]
    if not _is_loopback(host):
        logger.warning(
            "binding the re-rank service to %s: it has no authentication; anyone who can reach this address "
            "can use the model",
            host,
        )
    app = create_app(reranker, limits)
    uvicorn.run(app, host=host, port=port, log_level=log_level)
