"""Tests for the routehead.service app, with the original
``/rerank`` body: a real uvicorn server on loopback, spoken to with httpx, plus in-process
property-based tests of the input handling.

The reranker is a deterministic fake (score = number of distinct query words found in the document, ties
by index), so the file runs in seconds without a model.  The fake refuses to be entered concurrently,
which turns any failure of the server's serialisation into a visible error.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi import FastAPI
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from routehead.calibration import fallback
from routehead.errors import RouteheadError
from routehead.service import Limits, create_app, serve
from routehead.service import run as run_mod
from routehead.service.errors import GENERIC_500

# --------------------------------------------------------------------------------------------------
# Fake reranker
# --------------------------------------------------------------------------------------------------

FAKE_HEADS = [(0, 1), (2, 3)]
FAKE_MODEL = "fake/word-overlap"
SLOW_WORD = "SLOWQUERY"  # the fake sleeps when the query contains it (to hold the model busy)
TOO_LONG_WORD = "TOO_LONG_FOR_CONTEXT"  # the fake raises RouteheadError for a document containing it


@dataclass
class FakeRanking:
    indices: list[int]
    scores: list[float]
    heads: list[tuple[int, int]] | None


class FakeReranker:
    """Deterministic stand-in for routehead.api's reranker, with the same duck type.

    It detects overlapping calls (it is "not thread-safe" like the real one): an overlapping call is
    counted in ``overlaps`` and raises, so the server would answer 500 and the load test would fail.
    """

    def __init__(self, delay: float = 0.0) -> None:
        self.delay = delay
        self.calls = 0
        self.overlaps = 0
        self.fail_next: BaseException | None = None
        self.entered = threading.Event()
        self._busy = threading.Lock()

    def info(self) -> dict[str, Any]:
        return {"model": FAKE_MODEL, "method": "fake", "layers": [0, 2], "heads": FAKE_HEADS}

    def rerank(self, query: str, documents: list[str], routed_heads: bool = False) -> FakeRanking:
        if not self._busy.acquire(blocking=False):
            self.overlaps += 1
            raise AssertionError("FakeReranker.rerank entered concurrently")
        try:
            self.calls += 1
            self.entered.set()
            if SLOW_WORD in query:
                time.sleep(1.0)
            elif self.delay:
                time.sleep(self.delay)
            if self.fail_next is not None:
                exc, self.fail_next = self.fail_next, None
                raise exc
            if not query.strip():
                raise RouteheadError("query is empty")
            if not documents:
                raise RouteheadError("no documents to rank")
            for i, doc in enumerate(documents):
                if TOO_LONG_WORD in doc:
                    raise RouteheadError(f"document {i} does not fit the model's context window (fake)")
            return fake_rank(query, documents, routed_heads)
        finally:
            self._busy.release()


def fake_rank(query: str, documents: list[str], routed_heads: bool = False) -> FakeRanking:
    words = set(query.lower().split())
    raw = [float(len(words & set(doc.lower().split()))) for doc in documents]
    order = sorted(range(len(documents)), key=lambda i: (-raw[i], i))
    return FakeRanking(order, [raw[i] for i in order], list(FAKE_HEADS) if routed_heads else None)


def doc_text(doc: Any) -> str:
    return doc if isinstance(doc, str) else doc["text"]


def expected_results(payload: dict[str, Any]) -> list[dict[str, Any]]:
    """What /rerank must return for ``payload``, computed by the library call on a fresh fake."""
    texts = [doc_text(d) for d in payload["documents"]]
    ranking = FakeReranker().rerank(payload["query"], texts, routed_heads=payload.get("return_heads", False))
    top_n = payload.get("top_n")
    out = []
    for i, s in list(zip(ranking.indices, ranking.scores))[:top_n]:
        item: dict[str, Any] = {"index": i, "relevance_score": float(fallback().relevance([s])[0])}
        if payload.get("return_documents"):
            item["document"] = {"text": texts[i]}
        out.append(item)
    return out


# --------------------------------------------------------------------------------------------------
# Real server on loopback
# --------------------------------------------------------------------------------------------------

TEST_LIMITS = Limits(max_documents=50, max_document_chars=2000, max_query_chars=200, max_request_bytes=64_000)


@contextlib.contextmanager
def running_server(app: FastAPI) -> Iterator[str]:
    """uvicorn in a background thread on 127.0.0.1, on a free port chosen by the OS (port 0).

    Yields the base URL once /health answers; stops the server (and checks it stopped) on exit.
    """
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, name="test-uvicorn", daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 15
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.01)
        port = server.servers[0].sockets[0].getsockname()[1]
        base_url = f"http://127.0.0.1:{port}"
        with httpx.Client(base_url=base_url, timeout=5, trust_env=False) as client:
            while client.get("/health").status_code != 200:
                if time.monotonic() > deadline:
                    raise RuntimeError("/health never answered")
                time.sleep(0.01)
        yield base_url
    finally:
        server.should_exit = True
        thread.join(timeout=15)
        assert not thread.is_alive(), "uvicorn did not shut down"


@pytest.fixture(scope="module")
def fake() -> FakeReranker:
    return FakeReranker()


@pytest.fixture(scope="module")
def live(fake: FakeReranker) -> Iterator[str]:
    """Base URL of a real server on loopback, shared by the module (one uvicorn start)."""
    with running_server(create_app(fake, TEST_LIMITS)) as base_url:
        yield base_url


@pytest.fixture()
def client(live: str) -> Iterator[httpx.Client]:
    # trust_env=False: a proxy configured in the environment must not intercept loopback traffic.
    with httpx.Client(base_url=live, timeout=10, trust_env=False) as c:
        yield c


def post_json(client: httpx.Client, payload: Any) -> httpx.Response:
    # json.dumps (ASCII escapes) rather than httpx's json=, which cannot encode lone surrogates.
    return client.post("/rerank", content=json.dumps(payload), headers={"content-type": "application/json"})


def assert_error(resp: httpx.Response, status: int, type_: str, *fragments: str) -> None:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"message", "type"}, body
    assert body["error"]["type"] == type_, body
    for fragment in fragments:
        assert fragment in body["error"]["message"], body


DOCS = [
    "the cat sat on the mat",
    "dogs chase cats in the park",
    "a cat and a dog are friends",
    "quantum mechanics of the cat",
    "nothing relevant here",
]


# --------------------------------------------------------------------------------------------------
# Happy paths
# --------------------------------------------------------------------------------------------------


def test_health_reports_model_info_and_limits(client: httpx.Client) -> None:
    resp = client.get("/health")
    assert resp.status_code == 200
    body = resp.json()
    assert body["status"] == "ok"
    assert body["model"] == FAKE_MODEL and body["method"] == "fake"
    assert body["heads"] == [list(h) for h in FAKE_HEADS]
    assert body["limits"]["max_request_bytes"] == TEST_LIMITS.max_request_bytes


def test_server_binds_loopback(live: str) -> None:
    assert live.startswith("http://127.0.0.1:")


@pytest.mark.parametrize(
    "query",
    ["cat", "the cat dog", "park friends mat", "zebra", "THE CAT"],
)
def test_results_match_library_call(client: httpx.Client, query: str) -> None:
    resp = post_json(client, {"query": query, "documents": DOCS})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    ranking = FakeReranker().rerank(query, DOCS)
    assert [r["index"] for r in body["results"]] == ranking.indices
    assert [r["relevance_score"] for r in body["results"]] == list(fallback().relevance(ranking.scores))
    assert body["model"] == FAKE_MODEL
    assert "heads" not in body
    assert all("document" not in r for r in body["results"])
    assert body["meta"]["n_documents"] == len(DOCS)
    assert isinstance(body["meta"]["duration_ms"], float) and body["meta"]["duration_ms"] >= 0


@pytest.mark.parametrize("top_n", [1, 2, 5, 6, 1000])
def test_top_n_cuts_best_first(client: httpx.Client, top_n: int) -> None:
    payload = {"query": "the cat", "documents": DOCS, "top_n": top_n}
    resp = post_json(client, payload)
    assert resp.status_code == 200, resp.text
    results = resp.json()["results"]
    assert len(results) == min(top_n, len(DOCS))
    assert results == expected_results(payload)


def test_return_documents_with_objects_and_strings(client: httpx.Client) -> None:
    mixed = [d if i % 2 else {"text": d} for i, d in enumerate(DOCS)]
    as_strings = post_json(client, {"query": "cat dog", "documents": DOCS, "return_documents": True})
    as_mixed = post_json(client, {"query": "cat dog", "documents": mixed, "return_documents": True})
    as_objects = post_json(client, {"query": "cat dog", "documents": [{"text": d} for d in DOCS]})
    assert as_strings.status_code == as_mixed.status_code == as_objects.status_code == 200
    results = as_strings.json()["results"]
    assert results == as_mixed.json()["results"]
    assert [r["document"]["text"] for r in results] == [DOCS[r["index"]] for r in results]
    assert [r["index"] for r in as_objects.json()["results"]] == [r["index"] for r in results]
    assert all("document" not in r for r in as_objects.json()["results"])


def test_return_heads(client: httpx.Client) -> None:
    with_heads = post_json(client, {"query": "cat", "documents": DOCS, "return_heads": True})
    assert with_heads.status_code == 200
    assert with_heads.json()["heads"] == [[0, 1], [2, 3]]
    # The fake returns heads only when asked (routed_heads=True), so this also proves the flag is passed.
    without = post_json(client, {"query": "cat", "documents": DOCS, "return_heads": False})
    assert "heads" not in without.json()
    assert with_heads.json()["results"] == without.json()["results"]


def test_model_field(client: httpx.Client) -> None:
    """Any model name is accepted (clients send their provider's names); the response names the served one."""
    for name in (FAKE_MODEL, "other-model"):
        ok = post_json(client, {"query": "cat", "documents": DOCS, "model": name})
        assert ok.status_code == 200 and ok.json()["model"] == FAKE_MODEL


def test_health_stays_responsive_while_model_busy(
    client: httpx.Client, fake: FakeReranker, live: str
) -> None:
    fake.entered.clear()
    result: dict[str, httpx.Response] = {}

    def slow() -> None:
        with httpx.Client(base_url=live, timeout=10, trust_env=False) as c:
            result["resp"] = post_json(c, {"query": f"cat {SLOW_WORD}", "documents": DOCS})

    t = threading.Thread(target=slow)
    t.start()
    assert fake.entered.wait(5), "slow request never reached the model"
    t0 = time.perf_counter()
    health = client.get("/health")
    elapsed = time.perf_counter() - t0
    t.join(10)
    assert health.status_code == 200
    assert elapsed < 0.5, f"/health took {elapsed:.3f}s while the model was busy"
    assert result["resp"].status_code == 200


# --------------------------------------------------------------------------------------------------
# Load: 200 requests, 8 concurrent clients
# --------------------------------------------------------------------------------------------------


def test_fake_detects_concurrent_entry() -> None:
    """Without serialisation the fake does fail: the load test below would catch a missing lock."""
    fake = FakeReranker(delay=0.2)
    errors: list[BaseException] = []

    def call() -> None:
        try:
            fake.rerank("cat", DOCS)
        except AssertionError as exc:
            errors.append(exc)

    threads = [threading.Thread(target=call) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert fake.overlaps == 1 and len(errors) == 1


def test_load_200_requests_8_clients(live: str, fake: FakeReranker) -> None:
    payloads = [
        {"query": "cat", "documents": DOCS},
        {"query": "dog park", "documents": DOCS, "top_n": 2},
        {"query": "the mat", "documents": list(reversed(DOCS)), "return_documents": True},
        {"query": "quantum cat", "documents": [{"text": d} for d in DOCS], "return_heads": True},
        {"query": "friends", "documents": DOCS[:3], "top_n": 1, "return_documents": True},
        {"query": "nothing here", "documents": [f"doc {i} here" for i in range(30)], "top_n": 7},
        {"query": "a b c", "documents": ["c", "b c", "a b c", "a"], "return_heads": True},
        {"query": "zebra", "documents": DOCS + ["zebra zebra"]},
    ]
    expected = [expected_results(p) for p in payloads]
    local = threading.local()
    clients: list[httpx.Client] = []
    clients_lock = threading.Lock()

    def get_client() -> httpx.Client:
        if not hasattr(local, "client"):
            local.client = httpx.Client(base_url=live, timeout=10, trust_env=False)
            with clients_lock:
                clients.append(local.client)
        return local.client

    def one(k: int) -> tuple[int, int, Any]:
        which = k % len(payloads)
        resp = post_json(get_client(), payloads[which])
        return which, resp.status_code, resp.json()

    fake.delay = 0.002  # widen each call so overlapping entries would be caught
    calls_before, overlaps_before = fake.calls, fake.overlaps
    t0 = time.perf_counter()
    try:
        with ThreadPoolExecutor(max_workers=8) as pool:
            outcomes = list(pool.map(one, range(200)))
    finally:
        fake.delay = 0.0
        for c in clients:
            c.close()
    elapsed = time.perf_counter() - t0

    assert elapsed < 60, f"200 requests took {elapsed:.1f}s"
    errors = [(w, s, b) for w, s, b in outcomes if s != 200]
    assert errors == []
    for which, _, body in outcomes:
        assert body["results"] == expected[which], f"response mixed up for input {which}"
        assert body["meta"]["n_documents"] == len(payloads[which]["documents"])
        if payloads[which].get("return_heads"):
            assert body["heads"] == [[0, 1], [2, 3]]
        else:
            assert "heads" not in body
    assert fake.calls - calls_before == 200
    assert fake.overlaps == overlaps_before == 0
    print(f"\nload: 200 requests / 8 clients in {elapsed:.2f}s ({200 / elapsed:.0f} req/s)")


# --------------------------------------------------------------------------------------------------
# Bad inputs
# --------------------------------------------------------------------------------------------------

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
    resp = post_json(client, {"query": "cat", "documents": ["fine", f"this one is {TOO_LONG_WORD}"]})
    assert_error(resp, 422, "invalid_input", "document 1 does not fit")


def test_reranker_crash_is_500_then_recovers(client: httpx.Client, fake: FakeReranker) -> None:
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


# --------------------------------------------------------------------------------------------------
# Unit-level: malformed reranker output, Limits, serve()
# --------------------------------------------------------------------------------------------------


class BadOutputReranker:
    def __init__(self, ranking: FakeRanking) -> None:
        self.ranking = ranking

    def info(self) -> dict[str, Any]:
        return {"model": "bad"}

    def rerank(self, query: str, documents: list[str], routed_heads: bool = False) -> FakeRanking:
        return self.ranking


@pytest.mark.parametrize(
    "ranking",
    [
        FakeRanking([0, 0], [1.0, 1.0], None),  # duplicate index
        FakeRanking([0, 7], [1.0, 0.5], None),  # out of range
        FakeRanking([0, 1], [1.0], None),  # misaligned
        FakeRanking([0, 1], [float("nan"), 0.0], None),  # not JSON
        FakeRanking([0.0, 1.0], [1.0, 0.0], None),  # type: ignore[list-item]  # float indices
    ],
)
def test_malformed_ranking_is_500(ranking: FakeRanking) -> None:
    with TestClient(create_app(BadOutputReranker(ranking)), raise_server_exceptions=False) as tc:
        resp = tc.post("/rerank", json={"query": "q", "documents": ["a", "b"]})
    assert resp.status_code == 500
    assert resp.json() == {"error": {"message": GENERIC_500, "type": "internal_error"}}


def test_return_heads_when_reranker_has_none() -> None:
    """A reranker that routes nothing (e.g. ICR over all heads) answers ``"heads": null``, not a missing key."""
    app = create_app(BadOutputReranker(FakeRanking([1, 0], [2.0, 1.0], None)))
    with TestClient(app) as tc:
        body = tc.post("/rerank", json={"query": "q", "documents": ["a", "b"], "return_heads": True}).json()
    assert body["heads"] is None
    assert [r["index"] for r in body["results"]] == [1, 0]
    assert body["model"] == "bad"


def test_limits_defaults_and_validation() -> None:
    assert Limits() == Limits(
        max_documents=1000, max_document_chars=20000, max_query_chars=4000, max_request_bytes=5_000_000,
        max_request_tokens=65536,
    )
    with pytest.raises(ValueError, match="max_documents"):
        Limits(max_documents=0)
    with pytest.raises(ValueError, match="max_request_bytes"):
        Limits(max_request_bytes=True)


def test_serve_defaults_to_loopback_and_takes_a_factory(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, Any] = {}
    monkeypatch.setattr(run_mod, "_run_server", lambda server: seen.update(server=server))
    made: list[FakeReranker] = []

    def factory() -> FakeReranker:
        made.append(FakeReranker())
        return made[-1]

    serve(factory)
    cfg = seen["server"].config
    assert cfg.host == "127.0.0.1" and cfg.port == 8000
    assert isinstance(cfg.app, FastAPI)
    assert made == []  # the factory runs at start-up, after the socket opens (503 until loaded)
    assert cfg.app.state.service.factory is factory

    instance = FakeReranker()
    serve(instance, port=9123, limits=TEST_LIMITS)
    cfg = seen["server"].config
    assert cfg.app.state.reranker is instance and cfg.port == 9123
    assert cfg.app.state.limits == TEST_LIMITS


def test_serve_warns_on_public_bind(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(run_mod, "_run_server", lambda server: None)
    with caplog.at_level(logging.WARNING, logger="routehead.server"):
        serve(FakeReranker(), host="0.0.0.0")
    assert "no authentication" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="routehead.server"):
        serve(FakeReranker(), host="::1")
    assert caplog.text == ""


# --------------------------------------------------------------------------------------------------
# Property-based: in-process (TestClient) for speed
# --------------------------------------------------------------------------------------------------

PROP_LIMITS = Limits(max_documents=8, max_document_chars=40, max_query_chars=40, max_request_bytes=4000)


@pytest.fixture(scope="module")
def tc() -> Iterator[TestClient]:
    with TestClient(create_app(FakeReranker(), PROP_LIMITS), raise_server_exceptions=False) as c:
        yield c


# Any character, surrogates included (JSON can carry them as \ud800 escapes).
any_text = st.text(st.characters(codec=None, exclude_categories=()), max_size=50)
words = st.text(st.sampled_from("abc "), max_size=12)
json_scalars = (
    st.none() | st.booleans() | st.integers(-(10**20), 10**20) | st.floats(allow_nan=False) | any_text
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(any_text, inner, max_size=3),
    max_leaves=8,
)
document_like = (
    words
    | any_text
    | st.fixed_dictionaries({"text": words | any_text})
    | st.fixed_dictionaries({"text": json_values})
    | st.dictionaries(any_text, json_values, max_size=2)
    | json_values
)
field_keys = st.sampled_from(["query", "documents", "top_n", "return_documents", "return_heads", "model"])
payloads = st.one_of(
    st.fixed_dictionaries(
        {
            "query": words | any_text | json_values,
            "documents": st.lists(document_like, max_size=10) | json_values,
        },
        optional={
            "top_n": st.integers(-3, 12) | json_values,
            "return_documents": st.booleans() | json_values,
            "return_heads": st.booleans() | json_values,
            "model": st.just(FAKE_MODEL) | any_text,
            "extra": json_values,
        },
    ),
    st.dictionaries(field_keys | any_text, json_values, max_size=4),
    json_values,
)

PROP_SETTINGS = settings(
    max_examples=50,
    deadline=None,
    database=None,  # no .hypothesis/ directory in the repo
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def check_ok_response(payload: dict[str, Any], body: dict[str, Any]) -> None:
    """A 200 must be a best-first prefix of a permutation of the input indices, equal to the library call."""
    n = len(payload["documents"])
    results = body["results"]
    indices = [r["index"] for r in results]
    scores = [r["relevance_score"] for r in results]
    top_n = payload.get("top_n")
    assert len(indices) == (n if top_n is None else min(top_n, n))
    assert len(set(indices)) == len(indices) and all(0 <= i < n for i in indices)
    assert scores == sorted(scores, reverse=True)
    assert results == expected_results(payload)
    assert body["meta"]["n_documents"] == n


@PROP_SETTINGS
@given(payload=payloads)
def test_property_malformed_input_never_500(tc: TestClient, payload: Any) -> None:
    resp = tc.post("/rerank", content=json.dumps(payload), headers={"content-type": "application/json"})
    assert resp.status_code == 200 or 400 <= resp.status_code < 500, resp.text
    body = resp.json()
    if resp.status_code == 200:
        check_ok_response(payload, body)
    else:
        assert isinstance(body["error"]["message"], str) and body["error"]["message"]
        assert isinstance(body["error"]["type"], str)


@PROP_SETTINGS
@given(raw=st.binary(max_size=300) | any_text.map(lambda s: s.encode("utf-8", "surrogatepass")))
def test_property_raw_bytes_never_500(tc: TestClient, raw: bytes) -> None:
    resp = tc.post("/rerank", content=raw, headers={"content-type": "application/json"})
    assert 400 <= resp.status_code < 500, resp.text
    assert set(resp.json()["error"]) == {"message", "type"}


@PROP_SETTINGS
@given(
    query=words.filter(lambda q: q.strip()),
    documents=st.lists(words | st.fixed_dictionaries({"text": words}), min_size=1, max_size=8),
    top_n=st.none() | st.integers(1, 10),
    return_documents=st.booleans(),
)
def test_property_valid_input_ranks_like_library(
    tc: TestClient, query: str, documents: list[Any], top_n: int | None, return_documents: bool
) -> None:
    payload: dict[str, Any] = {"query": query, "documents": documents, "return_documents": return_documents}
    if top_n is not None:
        payload["top_n"] = top_n
    resp = tc.post("/rerank", json=payload)
    assert resp.status_code == 200, resp.text
    check_ok_response(payload, resp.json())
