"""The service over HTTP, refusing bad input: every malformed body, limit and reranker failure answers its status
and the one error shape (a real uvicorn server on loopback around the fake of ``conftest.py``).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.service.conftest import DOCS, TEST_LIMITS, TOO_LONG, BatchFake, assert_error, expected_results, post_json

BAD_INPUTS = [
    ("empty query", {"query": "", "documents": DOCS}, "validation_error", ["query", "empty"]),
    ("whitespace query", {"query": " \t\n ", "documents": DOCS}, "validation_error", ["query", "whitespace"]),
    ("missing query", {"documents": DOCS}, "validation_error", ["query", "required"]),
    ("non-string query", {"query": 3, "documents": DOCS}, "validation_error", ["query", "string"]),
    ("no documents", {"query": "cat", "documents": []}, "validation_error", ["documents", "at least one"]),
    ("missing documents", {"query": "cat"}, "validation_error", ["documents", "required"]),
    ("documents not a list", {"query": "cat", "documents": "cat"}, "validation_error", ["documents", "list"]),
    (
        "non-string document",
        {"query": "cat", "documents": ["a", 5]},
        "validation_error",
        ["documents[1]", "number"],
    ),
    (
        "null document",
        {"query": "cat", "documents": ["a", "b", None]},
        "validation_error",
        ["documents[2]", "null"],
    ),
    (
        "object without text",
        {"query": "cat", "documents": [{"txt": "a"}]},
        "validation_error",
        ["documents[0]", '"text"'],
    ),
    (
        "object with non-string text",
        {"query": "cat", "documents": [{"text": ["a"]}]},
        "validation_error",
        ["documents[0]", "array"],
    ),
    (
        "huge document",
        {"query": "cat", "documents": ["ok", "x" * (TEST_LIMITS.max_document_chars + 1)]},
        "limit_exceeded",
        ["documents[1]", "max_document_chars=2000", "2001"],
    ),
    (
        "huge query",
        {"query": "q" * (TEST_LIMITS.max_query_chars + 1), "documents": DOCS},
        "limit_exceeded",
        ["query", "max_query_chars=200"],
    ),
    (
        "too many documents",
        {"query": "cat", "documents": ["d"] * (TEST_LIMITS.max_documents + 1)},
        "limit_exceeded",
        ["51", "max_documents=50"],
    ),
    (
        "unknown field",
        {"query": "cat", "documents": DOCS, "topn": 3},
        "validation_error",
        ["'topn'", "unknown"],
    ),
    ("top_n = 0", {"query": "cat", "documents": DOCS, "top_n": 0}, "validation_error", ["top_n", "1"]),
    ("negative top_n", {"query": "cat", "documents": DOCS, "top_n": -2}, "validation_error", ["top_n"]),
    ("string top_n", {"query": "cat", "documents": DOCS, "top_n": "3"}, "validation_error", ["top_n"]),
    ("float top_n", {"query": "cat", "documents": DOCS, "top_n": 2.5}, "validation_error", ["top_n"]),
    (
        "string bool",
        {"query": "cat", "documents": DOCS, "return_documents": "yes"},
        "validation_error",
        ["return_documents"],
    ),
    ("array body", [{"query": "cat", "documents": DOCS}], "validation_error", ["JSON object", "array"]),
    (
        "lone surrogate",
        {"query": "cat", "documents": ["ok", "bad \ud800"]},
        "validation_error",
        ["documents[1]", "Unicode"],
    ),
]


@pytest.mark.parametrize(
    ("payload", "type_", "fragments"),
    [pytest.param(p, t, f, id=name) for name, p, t, f in BAD_INPUTS],
)
def test_bad_input(client: httpx.Client, payload: Any, type_: str, fragments: list[str]) -> None:
    assert_error(post_json(client, payload), 422, type_, *fragments)


@pytest.mark.parametrize(
    ("raw", "fragment"),
    [
        (b'{"query": "cat", "documents": [', "not valid JSON"),
        (b"", "empty"),
        (b"   ", "empty"),
        (b'{"query": "cat", "documents": ["a"], "top_n": NaN}', "NaN"),
        (b"\xff\xfe\xfa garbage", "UTF-8"),
        (b"[" * 20_000 + b"]" * 20_000, "nested too deeply"),
    ],
)
def test_invalid_json(client: httpx.Client, raw: bytes, fragment: str) -> None:
    resp = client.post("/rerank", content=raw, headers={"content-type": "application/json"})
    assert_error(resp, 422, "invalid_json", fragment)


def test_wrong_content_type(client: httpx.Client) -> None:
    resp = client.post(
        "/rerank",
        content=json.dumps({"query": "cat", "documents": DOCS}),
        headers={"content-type": "text/plain"},
    )
    assert_error(resp, 415, "unsupported_media_type", "application/json")
    # A charset parameter or a missing Content-Type is fine.
    ok = client.post(
        "/rerank",
        content=json.dumps({"query": "cat", "documents": DOCS}),
        headers={"content-type": "application/json; charset=utf-8"},
    )
    assert ok.status_code == 200
    no_header = client.post("/rerank", content=json.dumps({"query": "cat", "documents": DOCS}))
    assert no_header.status_code == 200


def test_body_over_limit_by_content_length(client: httpx.Client) -> None:
    payload = {"query": "cat", "documents": ["word " * 300] * 50}  # ~75 kB > 64 kB
    body = json.dumps(payload).encode()
    assert len(body) > TEST_LIMITS.max_request_bytes
    resp = client.post("/rerank", content=body, headers={"content-type": "application/json"})
    assert_error(resp, 413, "payload_too_large", "max_request_bytes=64000", str(len(body)))


def test_body_over_limit_chunked(client: httpx.Client) -> None:
    """No Content-Length (chunked upload): the bytes actually received are counted."""

    def chunks() -> Iterator[bytes]:
        yield b'{"query": "cat", "documents": ["'
        for _ in range(10):
            yield b"x" * 10_000
        yield b'"]}'

    resp = client.post("/rerank", content=chunks(), headers={"content-type": "application/json"})
    assert_error(resp, 413, "payload_too_large", "max_request_bytes=64000")


def test_body_just_under_limit_is_accepted(client: httpx.Client) -> None:
    payload = {"query": "cat", "documents": ["cat " * 400] * 35}
    assert 50_000 < len(json.dumps(payload)) < TEST_LIMITS.max_request_bytes
    assert post_json(client, payload).status_code == 200


def test_reranker_routehead_error_is_422(client: httpx.Client) -> None:
    resp = post_json(client, {"query": "cat", "documents": ["fine", f"this one is {TOO_LONG}"]})
    assert_error(resp, 422, "invalid_input", "document 1 does not fit")


def test_reranker_crash_is_500_then_recovers(client: httpx.Client, fake: BatchFake) -> None:
    fake.fail_next = RuntimeError("CUDA exploded: secret internals")
    resp = post_json(client, {"query": "cat", "documents": DOCS})
    assert_error(resp, 500, "internal_error", "Internal server error")
    assert "secret" not in resp.text  # internals are logged, not leaked
    again = post_json(client, {"query": "cat", "documents": DOCS})
    assert again.status_code == 200
    assert again.json()["results"] == expected_results({"query": "cat", "documents": DOCS})


def test_unknown_route_and_method_use_error_shape(client: httpx.Client) -> None:
    assert_error(client.get("/nope"), 404, "not_found")
    assert_error(client.get("/rerank"), 405, "method_not_allowed")


def test_openapi_schema_builds(client: httpx.Client) -> None:
    resp = client.get("/openapi.json")
    assert resp.status_code == 200
    schema = resp.json()["paths"]["/rerank"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    cohere_shape, tei_shape = schema["anyOf"]
    expected = {"query", "documents", "top_n", "return_documents", "return_heads", "model"}
    assert expected <= set(cohere_shape["properties"])
    assert {"query", "texts", "raw_scores", "return_text", "truncate"} <= set(tei_shape["properties"])

