"""A re-rank request's body: Content-Type, JSON, which shape (Cohere/Jina or TEI), validation and the limits
that cost nothing to check, each failure a precise 415/422 (:class:`Refused`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Collection, Mapping, Sequence
from typing import Any

from fastapi import Request, Response
from pydantic import ValidationError

from routehead.service.config import Limits
from routehead.service.errors import clip, error, format_validation_errors, is_valid_unicode, json_type
from routehead.service.shapes import RerankRequest, TEIRequest, allowed_fields

_HEADER_SAFE = re.compile(r"[A-Za-z0-9_.\-]{1,64}")
MAX_REPORTED = 10


class Refused(Exception):
    """A request answered before (or instead of) a ranking: an error (``status``, ``type_``, ``message``, in the
    error shape of the endpoint, :meth:`response`) or, with ``type_`` None, a bare status (499); counted under
    ``reason`` in ``routehead_request_failures_total`` (None: not counted)."""

    def __init__(self, status: int, type_: str | None, message: str, reason: str | None,
                 headers: Mapping[str, str] | None = None) -> None:
        super().__init__(reason)
        self.status = status
        self.type = type_
        self.message = message
        self.reason = reason
        self.headers = headers

    def response(self, path: str) -> Response:
        if self.type is None:
            return Response(status_code=self.status)
        return error(self.status, self.type, self.message, self.headers, path=path)


def invalid(status: int, type_: str, message: str) -> Refused:
    return Refused(status, type_, message, "invalid_request")


def limit_exceeded(message: str) -> Refused:
    return Refused(422, "limit_exceeded", message, "limit_exceeded")


def ignored_header(names: Sequence[str]) -> str:
    """The ``x-ignored-fields`` value: the ignored names that are safe in a header (at most ``MAX_REPORTED``), and
    how many others there were."""
    safe = [n for n in names if _HEADER_SAFE.fullmatch(n)]
    shown = safe[:MAX_REPORTED]
    more = len(names) - len(shown)
    return ", ".join(shown) + (f"{', ' if shown else ''}+{more} more" if more else "")


def _reject_constant(name: str) -> Any:
    """``json.loads`` accepts NaN/Infinity by default; they are not JSON, so refuse them."""
    raise ValueError(f"{name} is not valid JSON")


def _check_content_type(content_type: str | None) -> None:
    if content_type is None:
        return
    media = content_type.split(";", 1)[0].strip().lower()
    if not (media == "application/json" or (media.startswith("application/") and media.endswith("+json"))):
        raise invalid(415, "unsupported_media_type",
                      f"Content-Type must be application/json, got {clip(content_type)!r}")


def _decode(raw: bytes) -> dict[str, Any]:
    if not raw.strip():
        raise invalid(422, "invalid_json", "request body is empty; expected a JSON object")
    try:
        payload = json.loads(raw, parse_constant=_reject_constant)
    except UnicodeDecodeError:
        raise invalid(422, "invalid_json", "request body is not valid UTF-8 JSON") from None
    except json.JSONDecodeError as exc:
        raise invalid(422, "invalid_json", f"request body is not valid JSON: {exc.msg} (line {exc.lineno}, "
                      f"column {exc.colno})") from None
    except (ValueError, RecursionError) as exc:
        reason = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
        raise invalid(422, "invalid_json", f"request body is not valid JSON: {reason}") from None
    if not isinstance(payload, dict):
        raise invalid(422, "validation_error", f"request body must be a JSON object, got {json_type(payload)}")
    return payload


def _validate(payload: dict[str, Any], limits: Limits, tei_allowed: bool) -> RerankRequest | TEIRequest:
    model: type[RerankRequest] | type[TEIRequest] = (
        TEIRequest if tei_allowed and "texts" in payload and "documents" not in payload else RerankRequest)
    allowed = allowed_fields(model)
    unknown = [k for k in payload if k not in model.model_fields]
    if model is RerankRequest and any(not is_valid_unicode(k) for k in unknown):
        names = ", ".join(repr(clip(k)) for k in unknown[:5])
        raise invalid(422, "validation_error", f"unknown field(s) {names} (allowed fields: {allowed})")
    docs = payload.get("texts" if model is TEIRequest else "documents")
    if isinstance(docs, list) and len(docs) > limits.max_documents:
        # checked before validation so a flood of tiny documents costs nothing to refuse
        raise invalid(422, "limit_exceeded", f"too many documents: {len(docs)}; the limit is "
                      f"max_documents={limits.max_documents}")
    try:
        return model.model_validate(payload)
    except ValidationError as exc:
        raise invalid(422, "validation_error", format_validation_errors(exc.errors(), allowed)) from None


async def parse_body(request: Request, limits: Limits, tei_allowed: bool
                     ) -> tuple[RerankRequest | TEIRequest, list[str]]:
    """The request's body as a :class:`RerankRequest` (or a :class:`TEIRequest` where ``tei_allowed`` and the body
    has ``texts``) and the names of the fields it ignored (TEI's shape ignores unknown fields, as TEI does), or
    :class:`Refused` (415, 422)."""
    _check_content_type(request.headers.get("content-type"))
    payload = _decode(await request.body())  # the body is bounded by BodyGuard
    req = _validate(payload, limits, tei_allowed)
    ignored = [k for k in payload if k not in TEIRequest.model_fields] if isinstance(req, TEIRequest) else []
    return req, ignored


def check_lengths(query: str, texts: Sequence[str], limits: Limits, joined: Collection[int] = ()) -> None:
    """``max_query_chars`` and ``max_document_chars`` (on the text ranked: ``joined`` names the documents whose
    text is their ``rank_fields`` as ``field: value`` lines), or :class:`Refused` (422 ``limit_exceeded``)."""
    if len(query) > limits.max_query_chars:
        raise limit_exceeded(f"query has {len(query)} characters; the limit is "
                             f"max_query_chars={limits.max_query_chars}")
    for i, text in enumerate(texts):
        if len(text) > limits.max_document_chars:
            what = " (its rank_fields as 'field: value' lines)" if i in joined else ""
            raise limit_exceeded(f"documents[{i}]{what} has {len(text)} characters; the limit is "
                                 f"max_document_chars={limits.max_document_chars}")
