"""The error shape of every non-2xx response, and readable messages for validation failures.

Every error is ``{"error": {"message": str, "type": str}}``: ``message`` is for a human (it names the field,
the index and the limit), ``type`` is a stable tag for code.  Messages may quote client input, which may hold
lone surrogates; those are escaped so building an error can never itself fail.

Where the clients of an API shape parse something else, the body carries that too (:func:`error_body`), beside
``error``: on ``/v1/rerank`` (Jina) a ``detail`` string, the message, which Jina's LangChain and LlamaIndex clients
raise with (``RuntimeError(resp["detail"])``); on ``/rerank`` (Infinity, a FastAPI app) FastAPI's ``detail``: the
message, and on a 422 the list ``[{"loc", "msg", "type"}]`` that Infinity's client parses.  ``/v2/rerank``
(Cohere) and the other endpoints keep the one shape (OpenAI's clients read ``error.message``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from fastapi.responses import JSONResponse
from pydantic import BaseModel
from pydantic_core import PydanticCustomError

GENERIC_500 = "Internal server error while re-ranking; see the server log for details."

HTTP_TYPES = {400: "bad_request", 404: "not_found", 405: "method_not_allowed", 408: "request_timeout",
              413: "payload_too_large", 429: "overloaded", 503: "not_ready", 504: "timeout"}


class ErrorDetail(BaseModel):
    """What went wrong (``message``, for humans) and a stable tag (``type``, for code)."""

    message: str
    type: str


class ErrorResponse(BaseModel):
    """The error shape of every non-2xx response."""

    error: ErrorDetail


class ValidationDetail(BaseModel):
    """One item of FastAPI's 422 ``detail`` list."""

    loc: list[str | int]
    msg: str
    type: str


class DetailedErrorResponse(ErrorResponse):
    """The error shape on ``/v1/rerank`` and ``/rerank``: also ``detail`` (Jina's and Infinity's clients read it):
    the message, or on a 422 of ``/rerank`` FastAPI's one-item list ``[{"loc", "msg", "type"}]``."""

    detail: str | list[ValidationDetail]


DETAIL_PATHS = {"/v1/rerank": "string", "/rerank": "fastapi"}


def error_body(status: int, type_: str, message: str, path: str | None = None) -> dict[str, Any]:
    """The error body for a response on ``path`` (see the module docstring)."""
    message = message.encode("utf-8", "backslashreplace").decode("utf-8")
    body: dict[str, Any] = {"error": {"message": message, "type": type_}}
    detail = DETAIL_PATHS.get(path or "")
    if detail == "fastapi" and status == 422:
        body["detail"] = [{"loc": ["body"], "msg": message, "type": type_}]
    elif detail is not None:
        body["detail"] = message
    return body


def error(status: int, type_: str, message: str, headers: Mapping[str, str] | None = None,
          path: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, type_, message, path), status_code=status,
                        headers=dict(headers) if headers else None)


def clip(text: str, limit: int = 60) -> str:
    """Shorten client-controlled strings before echoing them in an error message."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


def json_type(value: object) -> str:
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


def is_valid_unicode(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def check_unicode(text: str) -> None:
    """Reject lone surrogates (legal in JSON ``\\ud800`` escapes, not in UTF-8): they would crash the tokenizer."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise PydanticCustomError("invalid_unicode", "contains invalid Unicode (a lone surrogate at character "
                                  "{pos})", {"pos": exc.start}) from None


def _format_loc(loc: Sequence[int | str]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + clip(str(part))
    return out


def format_validation_errors(errors: Sequence[Any], allowed: str) -> str:
    """One readable line per error (at most five): ``documents[3]: document must be a string...``."""
    parts = []
    for err in errors[:5]:
        loc = [p for p in err.get("loc", ()) if p != "body"]
        # pydantic names union branches in the location (documents.0.str); drop them
        loc = [p for p in loc if p not in ("str", "function-before[_check_document(), union[str,dict[str,any]]]")]
        where = _format_loc(loc)
        if err.get("type") == "extra_forbidden":
            parts.append(f"unknown field {where!r} (allowed fields: {allowed})")
        elif err.get("type") == "too_short" and len(loc) == 1:
            parts.append(f"{where}: must contain at least one item")
        elif err.get("type") == "missing":
            parts.append(f"{where}: field required" if where else "field required")
        else:
            parts.append(f"{where}: {err.get('msg')}" if where else str(err.get("msg")))
    if len(errors) > 5:
        parts.append(f"... and {len(errors) - 5} more error(s)")
    return "; ".join(parts)
