"""Shared by the service tests: a batch-capable fake reranker and a real uvicorn server on loopback.

The fake scores a document by the number of distinct query words it contains (ties by index), so expected
answers are computable without a model.  It refuses to be entered concurrently (a replica must never be), it
sleeps on ``SLOW`` queries (to hold a replica busy), raises on documents containing ``BOOM`` (a model error
on one request of a batch) and gives evidence (the query words found) when asked.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import httpx
import uvicorn

from routehead.errors import RouteheadError
from routehead.service.config import ServiceSettings
from routehead.service.run import build_server

FAKE_MODEL = "fake/word-overlap"
FAKE_HEADS = [(0, 1), (2, 3)]
SLOW = "SLOWQUERY"
BOOM = "BOOM"
TOO_LONG = "TOO_LONG_FOR_CONTEXT"


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


class BatchFake:
    """A fake with ``rerank`` and ``rerank_many`` (the lead's signature) that records its calls."""

    def __init__(self, delay: float = 0.0, batched: bool = True) -> None:
        self.delay = delay
        self.calls: list[int] = []  # size of each call (1 for rerank)
        self.overlaps = 0
        self.entered = threading.Event()
        self.release = threading.Event()
        self.release.set()
        self._busy = threading.Lock()
        if not batched:
            self.rerank_many = None  # type: ignore[assignment]

    def info(self) -> dict[str, Any]:
        return {"model": FAKE_MODEL, "method": "fake", "norm": "sum"}

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
            elif self.delay:
                time.sleep(self.delay)
            for ds in docs:
                for i, d in enumerate(ds):
                    if BOOM in d:
                        raise RuntimeError("the model broke on this document")
                    if TOO_LONG in d:
                        raise RouteheadError(f"document {i} does not fit (fake)")
            yield
        finally:
            self._busy.release()

    def rerank(self, query: str, documents: Sequence[str], first_stage_scores: Sequence[float] | None = None,
               routed_heads: bool = False, evidence: int = 0) -> FakeRanking:
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


__all__ = ["BOOM", "FAKE_MODEL", "SLOW", "BatchFake", "FakeRanking", "fake_rank", "live_server", "uvicorn"]
