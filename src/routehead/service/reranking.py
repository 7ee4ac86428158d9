"""The re-rank endpoints: ``POST /v1/rerank``, ``/v2/rerank`` and ``/rerank`` (see :mod:`routehead.service.app`).

One request goes: readiness, body (:mod:`~routehead.service.parsing`), character limits, ``max_tokens_per_doc``
truncation, the reranker's prompt token count (with the request's ``max_chunks_per_doc``, where the reranker
chunks: :func:`~routehead.service.protocol.takes_chunks`) against ``max_request_tokens``, the queue
(:class:`~routehead.service.batching.Batcher`), the checked ranking (:class:`~routehead.service.shapes.Scored`),
and the response in the request's shape with the timing headers.  Each step that can refuse raises
:class:`~routehead.service.parsing.Refused`, so the steps read in order and every refusal is counted once; it is
answered in the error shape of the endpoint (:func:`~routehead.service.errors.error_body`).

Draining (SIGTERM): the queue answers every admitted request before the grace ends (a ranking, or 503 with
Retry-After); should the server cancel a handler all the same, it answers 503 too, never uvicorn's plain 500.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from typing import Any

from fastapi import Request, Response
from fastapi.responses import JSONResponse

from routehead.errors import RouteheadError
from routehead.service.batching import Outcome, QueueFull, ShuttingDown, Work
from routehead.service.errors import GENERIC_500, error
from routehead.service.parsing import Refused, check_lengths, ignored_header, limit_exceeded, parse_body
from routehead.service.protocol import takes_chunks
from routehead.service.responses import RerankResponse, TEIResult
from routehead.service.shapes import RerankRequest, Scored, TEIRequest, cohere_results, tei_results
from routehead.service.state import ServiceState

logger = logging.getLogger("routehead.service")

IGNORED_FIELDS = ("relevant_spans", "priority")


def _ms(seconds: float) -> str:
    return str(round(seconds * 1000.0, 3))


def _state(request: Request) -> ServiceState:
    return request.app.state.service


async def _until_disconnect(request: Request) -> None:
    """Returns when the client has gone away (after the body, the ASGI server sends only ``http.disconnect``)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def _retry(state: ServiceState, seconds: int | None = None) -> dict[str, str]:
    return {"Retry-After": str(seconds if seconds is not None else state.settings.retry_after_s)}


def _check_ready(state: ServiceState) -> None:
    if not state.ready or state.batcher is None:
        raise Refused(503, "not_ready", f"the model is not ready ({state.status})"
                      + (f": {state.message}" if state.message else ""), "not_ready", _retry(state))


async def _fit(state: ServiceState, req: RerankRequest | TEIRequest, texts: list[str]) -> tuple[list[str], int]:
    """The documents after ``max_tokens_per_doc`` and the request's prompt tokens, or 422 past
    ``max_request_tokens`` (or for input the reranker refuses to count)."""
    max_tokens = None if isinstance(req, TEIRequest) else req.max_tokens_per_doc
    if max_tokens is not None:
        assert state.truncate is not None
        texts = await asyncio.to_thread(state.truncate, texts, max_tokens)
    chunks = {"max_chunks_per_doc": req.max_chunks_per_doc} if _chunks(state, req) else {}
    try:
        tokens = await asyncio.to_thread(state.counter.prompt_tokens, req.query, texts, **chunks)
    except RouteheadError as exc:
        raise Refused(422, "invalid_input", str(exc), "invalid_input") from None
    limit = state.limits.max_request_tokens
    if tokens > limit:
        raise limit_exceeded(f"the request is {tokens} prompt tokens; the limit is max_request_tokens={limit} "
                             "(send fewer or shorter documents)")
    return texts, tokens


async def _run(state: ServiceState, request: Request, work: Work) -> Outcome:
    """Queue the work and wait for it, or :class:`Refused`: 429/503/504/422/500, or 499 if the client left."""
    assert state.batcher is not None
    settings = state.settings
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
        raise Refused(499, None, "", "client_disconnected")  # nginx's "client closed request"
    try:
        return submit.result()
    except QueueFull as exc:
        reason = "queue_full" if exc.retry_after is None else "deadline"
        raise Refused(429, "overloaded", f"{exc}; retry later", reason, _retry(state, exc.retry_after)) from None
    except ShuttingDown as exc:
        raise Refused(503, "not_ready", str(exc), "shutting_down", _retry(state)) from None
    except TimeoutError:
        raise Refused(504, "timeout", f"no answer within request_timeout_s={settings.request_timeout_s:g} s; "
                      "the request was dropped", "timeout") from None
    except RouteheadError as exc:
        raise Refused(422, "invalid_input", str(exc), "invalid_input") from None
    except Exception:
        logger.exception("reranker failed")
        raise Refused(500, "internal_error", GENERIC_500, "model_error") from None


def _scored(state: ServiceState, got: Outcome, n_documents: int, evidence: int) -> Scored:
    try:
        return Scored(got.ranking, n_documents, state.calibration, evidence)
    except Exception:
        logger.exception("reranker returned a malformed ranking")
        raise Refused(500, "internal_error", GENERIC_500, "malformed_ranking") from None


def _cohere_body(state: ServiceState, req: RerankRequest, scored: Scored, texts: list[str], got: Outcome,
                 tokens: int, request_id: str, total: float, warnings: list[str]) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": request_id,
        "results": cohere_results(scored, texts, req.top_n, bool(req.return_documents), req.raw_scores,
                                  bool(req.return_evidence)),
        "model": state.model_name,
        "meta": {"api_version": {"version": "2", "is_experimental": False},
                 "billed_units": {"search_units": 1, "input_tokens": tokens}, "tokens": {"input_tokens": tokens},
                 "calibrated": state.calibration.calibrated, "duration_ms": round(total * 1000.0, 3),
                 "queue_ms": round(got.queue_s * 1000.0, 3), "inference_ms": round(got.inference_s * 1000.0, 3),
                 "batch_size": got.batch_size, "n_documents": len(texts)},
        "usage": {"total_tokens": tokens, "prompt_tokens": tokens},
    }
    if warnings:
        body["meta"]["warnings"] = warnings
    if req.return_heads:
        body["heads"] = scored.heads
        body["head_weights"] = scored.weights
    RerankResponse.model_validate(body)  # what is sent is what /openapi.json promises
    return body


def _chunks(state: ServiceState, req: RerankRequest | TEIRequest) -> bool:
    """Whether the request's ``max_chunks_per_doc`` is passed on: it sets one and the reranker takes it."""
    return req.max_chunks_per_doc is not None and takes_chunks(state.counter)


def _ignored(state: ServiceState, req: RerankRequest | TEIRequest) -> list[str]:
    """Warnings for the Cohere fields that are accepted and ignored (``max_chunks_per_doc`` where the reranker does
    not chunk), and documents ranked as empty texts."""
    if isinstance(req, TEIRequest):
        return []
    out = [f"{name} is accepted and ignored" + ("; use return_evidence" if name == "relevant_spans" else "")
           for name in IGNORED_FIELDS if getattr(req, name) is not None]
    if req.max_chunks_per_doc is not None and not _chunks(state, req):
        out.append("max_chunks_per_doc is accepted and ignored: this reranker does not chunk documents")
    elif req.max_chunks_per_doc is not None and state.calibration.calibrated \
            and req.max_chunks_per_doc != state.info.get("max_chunks_per_doc", 1):
        out.append(f"relevance_score is calibrated for max_chunks_per_doc={state.info.get('max_chunks_per_doc', 1)}"
                   f", this request asked for {req.max_chunks_per_doc}: it is approximate (raw_score is exact)")
    empty = req.without_rank_fields()
    if empty:
        listed = ", ".join(map(str, empty[:10])) + (", ..." if len(empty) > 10 else "")
        out.append(f"{len(empty)} document(s) have none of the rank_fields and were ranked as empty texts "
                   f"(documents {listed})")
    return out


def _work(req: RerankRequest | TEIRequest, texts: list[str], tokens: int) -> Work:
    fs = None if isinstance(req, TEIRequest) else req.first_stage_scores
    return Work(query=req.query, documents=texts, evidence=req.return_evidence, tokens=tokens,
                first_stage_scores=None if fs is None else [float(x) for x in fs],
                max_chunks_per_doc=req.max_chunks_per_doc)


def _observe(state: ServiceState, got: Outcome, work: Work, request_id: str, started: float,
             shape: str, ignored: list[str]) -> tuple[dict[str, str], float]:
    """Metrics and the log line of an answered request; its timing headers and total seconds."""
    metrics = state.metrics
    metrics.documents.inc(len(work.documents))
    metrics.queue_time.observe(got.queue_s)
    metrics.inference_time.observe(got.inference_s)
    total = time.perf_counter() - started
    headers = {"x-queue-time": _ms(got.queue_s), "x-inference-time": _ms(got.inference_s),
               "x-total-time": _ms(total), "x-request-id": request_id,
               "x-calibrated": "true" if state.calibration.calibrated else "false"}
    extra: dict[str, Any] = {"request_id": request_id, "documents": len(work.documents), "tokens": work.tokens,
                             "batch_size": got.batch_size, "queue_ms": round(got.queue_s * 1000, 3),
                             "inference_ms": round(got.inference_s * 1000, 3), "total_ms": round(total * 1000, 3),
                             "shape": shape}
    if ignored:
        headers["x-ignored-fields"] = ignored_header(ignored)
        extra["ignored_fields"] = headers["x-ignored-fields"]
    logger.info("rerank", extra=extra)
    return headers, total


async def _answer(state: ServiceState, request: Request, started: float, request_id: str,
                  tei_allowed: bool) -> Response:
    _check_ready(state)
    req, ignored = await parse_body(request, state.limits, tei_allowed)
    texts = list(req.texts) if isinstance(req, TEIRequest) else req.texts()
    check_lengths(req.query, texts, state.limits, () if isinstance(req, TEIRequest) else req.joined())
    texts, tokens = await _fit(state, req, texts)
    warnings = _ignored(state, req)
    if isinstance(req, TEIRequest) and req.max_chunks_per_doc is not None and not _chunks(state, req):
        ignored = [*ignored, "max_chunks_per_doc"]  # TEI's way: named in x-ignored-fields
    work = _work(req, texts, tokens)
    got = await _run(state, request, work)
    scored = _scored(state, got, len(texts), req.return_evidence)
    if req.return_evidence and scored.evidence is None:
        warnings.append("this reranker gives no evidence; evidence lists are empty")
    if isinstance(req, TEIRequest):
        headers, _ = _observe(state, got, work, request_id, started, "tei", ignored)
        items = tei_results(scored, texts, req.top_n, req.raw_scores, req.return_text, bool(req.return_evidence))
        for item in items:
            TEIResult.model_validate(item)
        return JSONResponse(items, headers=headers)
    headers, total = _observe(state, got, work, request_id, started, "cohere", ignored)
    return JSONResponse(_cohere_body(state, req, scored, texts, got, tokens, request_id, total, warnings),
                        headers=headers)


async def handle(request: Request, endpoint: str, tei_allowed: bool) -> Response:
    """One re-rank request on ``endpoint``, counted in ``routehead_requests_total`` by outcome."""
    state = _state(request)
    started = time.perf_counter()
    outcome = "error"
    try:
        try:
            response = await _answer(state, request, started, uuid.uuid4().hex, tei_allowed)
        except Refused as refused:
            if refused.reason is not None:
                state.metrics.failures.labels(reason=refused.reason).inc()
            response = refused.response(endpoint)
        outcome = "ok" if response.status_code < 400 else str(response.status_code)
        return response
    except asyncio.CancelledError:
        if state.status != "draining":
            outcome = "cancelled"
            raise
        # the server gave up waiting (its graceful timeout): answer rather than let it send a plain 500
        state.metrics.failures.labels(reason="shutting_down").inc()
        outcome = "503"
        return error(503, "not_ready", "the service is shutting down", _retry(state), path=endpoint)
    finally:
        state.metrics.requests.labels(endpoint=endpoint, outcome=outcome).inc()
        state.metrics.total_time.observe(time.perf_counter() - started)


async def rerank_v1(request: Request) -> Response:
    return await handle(request, "/v1/rerank", tei_allowed=False)


async def rerank_v2(request: Request) -> Response:
    return await handle(request, "/v2/rerank", tei_allowed=False)


async def rerank(request: Request) -> Response:
    return await handle(request, "/rerank", tei_allowed=True)
