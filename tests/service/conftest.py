"""Shared by the service tests: the fake reranker (a ``RerankerLike``), a real uvicorn server on loopback, and
the helpers of the tests that speak to one.

The fake scores a document by the number of distinct query words it contains (ties by index), so expected
answers are computable without a model.  It refuses to be entered concurrently (a replica must never be), it
sleeps on ``SLOW`` queries (to hold a replica busy), raises on documents containing ``BOOM`` (a model error
on one request of a batch), raises ``RouteheadError`` on ``TOO_LONG`` ones (input the model refuses), raises
``fail_next`` once when set, and gives evidence (the query words found) when asked.  Its prompt is 4
characters a token plus a fixed template and a few tokens a document (:meth:`BatchFake.prompt_tokens`).
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from routehead.calibration import fallback
from routehead.errors import RouteheadError
from routehead.service import Limits, ServiceSettings, create_app
from routehead.service.run import build_server

FAKE_MODEL = "fake/word-overlap"
FAKE_HEADS = [(0, 1), (2, 3)]
SLOW = "SLOWQUERY"  # the fake sleeps 1 s when the query contains it
BOOM = "BOOM"  # the fake raises RuntimeError on a document containing it
TOO_LONG = "TOO_LONG_FOR_CONTEXT"  # the fake raises RouteheadError on a document containing it
PROMPT_TOKENS, DOC_TOKENS, CHARS_PER_TOKEN = 48, 4, 4  # the fake's prompt template, per document, and tokenizer

DOCS = ["the cat sat on the mat", "dogs chase cats in the park", "a cat and a dog are friends",
        "quantum mechanics of the cat", "nothing relevant here"]
TEST_LIMITS = Limits(max_documents=50, max_document_chars=2000, max_query_chars=200, max_request_bytes=64_000)


@dataclass
class FakeRanking:
    indices: list[int]
    scores: list[float]
    heads: list[tuple[int, int]] | None = None
    weights: list[float] | None = None
    evidence: list[list[dict[str, Any]]] | None = None


def fake_rank(query: str, documents: Sequence[str], evidence: int = 0) -> FakeRanking:
    words = set(query.lower().split())
    raw = [float(len(words & set(doc.lower().split()))) for doc in documents]
    order = sorted(range(len(documents)), key=lambda i: (-raw[i], i))
    ev = None
    if evidence:
        ev = []
        for i in order:
            found = sorted(words & set(documents[i].lower().split()))[:evidence]
            ev.append([{"text": w, "share": 1.0 / len(found)} for w in found])
    return FakeRanking(order, [raw[i] for i in order], list(FAKE_HEADS), [0.5, 0.5], ev)


def _check_input(query: str, documents: Sequence[str]) -> None:
    """What the real Reranker refuses (the service validates first, so only a service bug gets here)."""
    if not query.strip():
        raise RouteheadError("query is empty")
    if not documents:
        raise RouteheadError("no documents to rank")


class BatchFake:
    """A ``RerankerLike`` fake (``rerank``, ``rerank_many``, ``info``, ``prompt_tokens``) that records its calls."""

    def __init__(self, delay: float = 0.0, per_item: float = 0.0) -> None:
        self.delay = delay
        self.per_item = per_item  # seconds per request of a call on top of ``delay``: a pass that grows with the batch
        self.calls: list[int] = []  # size of each call (1 for rerank)
        self.routed_heads: list[bool] = []  # the flag of each rerank call
        self.overlaps = 0
        self.fail_next: BaseException | None = None
        self.entered = threading.Event()
        self.release = threading.Event()
        self.release.set()
        self._busy = threading.Lock()

    def info(self) -> dict[str, Any]:
        return {"model": FAKE_MODEL, "method": "fake", "norm": "sum", "layers": [0, 2], "heads": FAKE_HEADS}

    def prompt_tokens(self, query: str, documents: Sequence[str]) -> int:
        _check_input(query, documents)
        lengths = [max(1, len(t) // CHARS_PER_TOKEN) for t in [query, *documents]]
        return PROMPT_TOKENS + sum(lengths) + DOC_TOKENS * len(documents)

    @contextlib.contextmanager
    def _enter(self, size: int, queries: Sequence[str], docs: Sequence[Sequence[str]]) -> Iterator[None]:
        if not self._busy.acquire(blocking=False):
            self.overlaps += 1
            raise AssertionError("fake entered concurrently")
        try:
            self.calls.append(size)
            self.entered.set()
            self.release.wait(10)
            if any(SLOW in q for q in queries):
                time.sleep(1.0)
            elif self.delay or self.per_item:
                time.sleep(self.delay + self.per_item * size)
            if self.fail_next is not None:
                exc, self.fail_next = self.fail_next, None
                raise exc
            for q, ds in zip(queries, docs):
                _check_input(q, ds)
                for i, d in enumerate(ds):
                    if BOOM in d:
                        raise RuntimeError("the model broke on this document")
                    if TOO_LONG in d:
                        raise RouteheadError(f"document {i} does not fit the model's context window (fake)")
            yield
        finally:
            self._busy.release()

    def rerank(self, query: str, documents: Sequence[str], first_stage_scores: Sequence[float] | None = None,
               routed_heads: bool = False, evidence: int = 0) -> FakeRanking:
        self.routed_heads.append(routed_heads)
        with self._enter(1, [query], [documents]):
            return fake_rank(query, documents, evidence)

    def rerank_many(self, items: Sequence[tuple], batch_size: int = 8, evidence: int = 0) -> list[FakeRanking]:
        with self._enter(len(items), [it[0] for it in items], [it[1] for it in items]):
            return [fake_rank(it[0], it[1], evidence) for it in items]


@contextlib.contextmanager
def live_server(app: Any, settings: ServiceSettings | None = None, wait_ready: bool = True) -> Iterator[str]:
    """The service's own uvicorn server (header timeout, limits) in a thread on 127.0.0.1, a free port."""
    server = build_server(app, "127.0.0.1", 0, settings or app.state.settings, log_level="warning")
    thread = threading.Thread(target=server.run, name="test-uvicorn", daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.01)
        port = server.servers[0].sockets[0].getsockname()[1]
        base = f"http://127.0.0.1:{port}"
        if wait_ready:
            with httpx.Client(base_url=base, timeout=5, trust_env=False) as c:
                while c.get("/ready").status_code != 200:
                    if time.monotonic() > deadline:
                        raise RuntimeError("/ready never answered 200")
                    time.sleep(0.02)
        yield base
    finally:
        server.should_exit = True
        thread.join(timeout=20)
        assert not thread.is_alive(), "uvicorn did not shut down"


# -- the tests that speak to a live server over HTTP (test_server_*.py) ---------------------------------------------
@pytest.fixture(scope="module")
def fake() -> BatchFake:
    return BatchFake()


@pytest.fixture(scope="module")
def live(fake: BatchFake) -> Iterator[str]:
    """Base URL of a real server on loopback around ``fake``, shared by the module (one uvicorn start).

    One request per model call (``batching=False``), so the fake's calls count the requests that reached it."""
    with live_server(create_app(fake, TEST_LIMITS, ServiceSettings(batching=False))) as base_url:
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
    """The error shape; on /v1/rerank and /rerank also ``detail`` (Jina's and Infinity's clients read it)."""
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body["error"]) == {"message", "type"}, body
    assert body["error"]["type"] == type_, body
    message = body["error"]["message"]
    if resp.request.url.path in ("/v1/rerank", "/rerank"):
        assert set(body) == {"error", "detail"}, body
        fastapi = status == 422 and resp.request.url.path == "/rerank"  # Infinity's client parses FastAPI's list
        want = [{"loc": ["body"], "msg": message, "type": type_}] if fastapi else message
        assert body["detail"] == want, body
    else:
        assert set(body) == {"error"}, body
    for fragment in fragments:
        assert fragment in message, body


def doc_text(doc: Any) -> str:
    return doc if isinstance(doc, str) else doc["text"]


def expected_results(payload: dict[str, Any]) -> list[dict[str, Any]]:
    """What /rerank must return for ``payload``, computed by the library call of the fake."""
    texts = [doc_text(d) for d in payload["documents"]]
    ranking = fake_rank(payload["query"], texts)
    out = []
    for i, s in list(zip(ranking.indices, ranking.scores))[:payload.get("top_n")]:
        item: dict[str, Any] = {"index": i, "relevance_score": float(fallback().relevance([s])[0])}
        if payload.get("return_documents"):
            item["document"] = {"text": texts[i]}
        out.append(item)
    return out
