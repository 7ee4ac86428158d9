"""Long documents through the service (tiny random Llama): Cohere's ``max_chunks_per_doc`` is honoured on every
shape, per request, over the server's default; it counts in the prompt tokens; a reranker that does not chunk says
it ignored it."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest
from fastapi.testclient import TestClient

from routehead.api import Reranker
from routehead.service import create_app
from routehead.service.batching import Work, _Replica
from routehead.service.protocol import takes_chunks
from routehead.testing.tiny import tiny_lm
from tests.service.conftest import BatchFake

Q = "which enzyme digests starch?"
LONG = "Paris is the capital. " * 3 + "Amylase digests starch into sugar in the mouth and gut."
DOCS = ["Lipase digests fat.", LONG, "The sky is blue."]


@pytest.fixture(scope="module")
def lm():
    return tiny_lm("llama")


def scores(r: Any) -> dict[int, float]:
    return dict(zip(r.indices, r.scores))


def test_every_shape_honours_max_chunks_per_doc(lm):
    """Cohere v1/v2, Jina (``documents``) and TEI (``texts``): a request's max_chunks_per_doc gives the library's
    chunked ranking and its token count; without it, the server's default (here truncation) applies."""
    rr = Reranker(model=lm, method="icr", max_doc_tokens=24)
    assert takes_chunks(rr)
    chunked, trunc = rr.rerank(Q, DOCS, max_chunks_per_doc=3), rr.rerank(Q, DOCS)
    assert scores(chunked) != scores(trunc)
    with TestClient(create_app(rr)) as client:
        for path in ("/v1/rerank", "/v2/rerank", "/rerank"):
            body = client.post(path, json={"query": Q, "documents": DOCS, "max_chunks_per_doc": 3,
                                           "raw_scores": True}).json()
            assert {x["index"]: x["raw_score"] for x in body["results"]} == scores(chunked)
            assert body["meta"]["billed_units"]["input_tokens"] == rr.prompt_tokens(Q, DOCS, max_chunks_per_doc=3)
            assert not any("max_chunks_per_doc" in w for w in body["meta"].get("warnings", []))
            plain = client.post(path, json={"query": Q, "documents": DOCS, "raw_scores": True}).json()
            assert {x["index"]: x["raw_score"] for x in plain["results"]} == scores(trunc)
        tei = client.post("/rerank", json={"query": Q, "texts": DOCS, "max_chunks_per_doc": 3, "raw_scores": True})
        assert tei.status_code == 200 and "x-ignored-fields" not in tei.headers
        assert {x["index"]: x["score"] for x in tei.json()} == scores(chunked)
        bad = client.post("/v2/rerank", json={"query": Q, "documents": DOCS, "max_chunks_per_doc": 0})
        assert bad.status_code == 422 and "max_chunks_per_doc" in bad.text
        assert "max_chunks_per_doc" in client.get("/openapi.json").text


def test_server_default_and_request_override(lm):
    """``routehead serve --max-chunks-per-doc`` is the Reranker's setting: requests without the field chunk; one
    asking for 1 is truncated; the token limit counts the chunks."""
    rr = Reranker(model=lm, method="icr", max_doc_tokens=24, max_chunks_per_doc=3)
    with TestClient(create_app(rr)) as client:
        got = client.post("/v2/rerank", json={"query": Q, "documents": DOCS, "raw_scores": True}).json()
        assert {x["index"]: x["raw_score"] for x in got["results"]} == scores(rr.rerank(Q, DOCS))
        one = client.post("/v2/rerank", json={"query": Q, "documents": DOCS, "raw_scores": True,
                                              "max_chunks_per_doc": 1}).json()
        assert {x["index"]: x["raw_score"] for x in one["results"]} == scores(rr.rerank(Q, DOCS,
                                                                                         max_chunks_per_doc=1))
        assert one["meta"]["billed_units"]["input_tokens"] < got["meta"]["billed_units"]["input_tokens"]


class NoChunks:
    """A reranker without max_chunks_per_doc (the service's fakes, other libraries)."""

    def __init__(self, rr: Reranker) -> None:
        self.rr = rr

    def rerank(self, query: str, documents: Sequence[str], first_stage_scores: Any = None, routed_heads: bool = False,
               evidence: int = 0) -> Any:
        return self.rr.rerank(query, documents, first_stage_scores, evidence=evidence)

    def rerank_many(self, items: Sequence[Any], batch_size: int = 8, evidence: int = 0) -> list[Any]:
        return self.rr.rerank_many(items, batch_size, evidence)

    def info(self) -> dict[str, Any]:
        return self.rr.info()

    def prompt_tokens(self, query: str, documents: Sequence[str]) -> int:
        return self.rr.prompt_tokens(query, documents)


def test_a_reranker_that_does_not_chunk_says_so(lm):
    rr = Reranker(model=lm, method="icr", max_doc_tokens=24)
    fake = NoChunks(rr)
    assert not takes_chunks(fake)
    with TestClient(create_app(fake)) as client:
        body = client.post("/v2/rerank", json={"query": Q, "documents": DOCS, "max_chunks_per_doc": 3}).json()
        assert any("max_chunks_per_doc is accepted and ignored" in w for w in body["meta"]["warnings"])
        tei = client.post("/rerank", json={"query": Q, "texts": DOCS, "max_chunks_per_doc": 3})
        assert tei.status_code == 200 and "max_chunks_per_doc" in tei.headers["x-ignored-fields"]


def test_batches_share_one_chunk_setting(lm):
    """A batched call carries one max_chunks_per_doc: requests asking for different ones never share a call; a
    replica passes the setting to a reranker that takes it."""
    import asyncio

    from routehead.service.batching import Batcher
    from tests.service.test_batching import _hold_then_submit

    fake = BatchFake()
    batcher = Batcher([fake])
    batcher.start()
    works = [Work(q, ["a cat", "a dog"], tokens=100, max_chunks_per_doc=k) for q, k in
             (("cat", 3), ("cat", None), ("dog", 3), ("dog", None))]
    asyncio.run(_hold_then_submit(batcher, fake, works))
    batcher.close()
    assert sorted(fake.calls[1:]) == [2, 2]
    rr = Reranker(model=lm, method="icr", max_doc_tokens=24)
    got = _Replica(rr, "r").rerank_batch([Work(Q, DOCS, max_chunks_per_doc=3), Work("sky", DOCS,
                                                                                    max_chunks_per_doc=3)])
    assert scores(got[0]) == pytest.approx(scores(rr.rerank(Q, DOCS, max_chunks_per_doc=3)), rel=1e-5)


def test_calibration_is_for_one_chunk_setting(lm):
    """A calibration fitted on truncated documents does not match a chunking server (uncalibrated fallback), and a
    calibrated server says a chunked request's relevance_score is approximate."""
    from routehead.calibration import Calibration

    cal = Calibration(key={"model": "tiny-llama", "method": "icr", "settings": {}}, features=["raw"], coef=[1.0],
                      intercept=0.0, calibrated=True)
    assert cal.matches({"model": "tiny-llama", "method": "icr"})
    assert cal.matches({"model": "tiny-llama", "method": "icr", "max_chunks_per_doc": 1})
    assert not cal.matches({"model": "tiny-llama", "method": "icr", "max_chunks_per_doc": 3})
    rr = Reranker(model=lm, method="icr", max_doc_tokens=24)
    with TestClient(create_app(rr, calibration=cal)) as client:
        body = client.post("/v2/rerank", json={"query": Q, "documents": DOCS, "max_chunks_per_doc": 3}).json()
        assert any("approximate" in w for w in body["meta"]["warnings"])
        plain = client.post("/v2/rerank", json={"query": Q, "documents": DOCS, "max_chunks_per_doc": 1}).json()
        assert "warnings" not in plain["meta"]
