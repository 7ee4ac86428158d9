"""The Reranker's public calls on a tiny model: rank's shape, rerank_many, evidence words, document order."""

from __future__ import annotations

import numpy as np

from routehead.api import Reranker
from routehead.testing.tiny import tiny_lm
from tests.toys import DOCS


def test_rank_is_crossencoder_shaped(tiny_router_reranker):
    out = tiny_router_reranker.rank("starch", DOCS, top_k=2)
    assert len(out) == 2 and set(out[0]) == {"corpus_id", "score", "text"}
    assert out[0]["text"] == DOCS[out[0]["corpus_id"]] and out[0]["score"] >= out[1]["score"]


def test_rerank_many_equals_one_at_a_time(tiny_router_reranker):
    rr = tiny_router_reranker
    items = [("which enzyme digests starch?", DOCS), ("capital of France", DOCS[:3]), ("sky colour", DOCS[1:])]
    many = rr.rerank_many(items, batch_size=3)
    for (q, docs), r in zip(items, many):
        one = rr.rerank(q, docs)
        assert r.indices == one.indices and r.heads == one.heads
        np.testing.assert_allclose(r.scores, one.scores, rtol=1e-5, atol=1e-7)


def test_evidence_words_come_from_the_document_and_share_its_score(tiny_router_reranker):
    r = tiny_router_reranker.rerank("which enzyme digests starch?", DOCS, evidence=3)
    assert r.evidence is not None and len(r.evidence) == len(DOCS)
    for i, ev in zip(r.indices, r.evidence):
        assert 1 <= len(ev) <= 3
        for w in ev:
            assert w["text"] in DOCS[i] and isinstance(w["share"], float)


def test_both_order_is_the_mean_of_input_and_reverse():
    lm = tiny_lm("llama")
    q = "which enzyme digests starch?"
    got = {o: Reranker(model=lm, method="icr", doc_order=o).rerank(q, DOCS) for o in ("input", "reverse", "both")}

    def by_doc(r):
        out = np.empty(len(DOCS))
        out[r.indices] = r.scores
        return out
    np.testing.assert_allclose(by_doc(got["both"]), (by_doc(got["input"]) + by_doc(got["reverse"])) / 2, rtol=1e-6)
