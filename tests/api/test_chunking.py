"""The Reranker on long documents: ``max_chunks_per_doc`` on the Reranker and per call, results per document."""

from __future__ import annotations

import numpy as np
import pytest

from routehead.api import Reranker
from routehead.engine.aggregate import HeadSet
from routehead.errors import RouteheadError
from routehead.testing.tiny import tiny_lm
from tests.toys import DOCS

LONG = "Paris is the capital. " * 3 + "Amylase digests starch into sugar in the mouth and gut."
LONG_DOCS = [DOCS[1], LONG, DOCS[2], DOCS[4]]
Q = "which enzyme digests starch?"


@pytest.fixture(scope="module")
def lm():
    return tiny_lm("llama")


def by_doc(r, n):
    out = np.empty(n)
    out[r.indices] = r.scores
    return out


@pytest.mark.parametrize("order", ["reverse", "input", "shuffle", "both"])
def test_chunked_ranking_is_per_document_and_maxp(lm, order):
    """Every order: one result per input document, each the best of its chunks scored in the same prompt (the
    chunks given as documents of their own, adjacent, in the document's prompt place)."""
    rr = Reranker(model=lm, method="icr", max_doc_tokens=24, max_chunks_per_doc=3, doc_order=order)
    r = rr.rerank(Q, LONG_DOCS)
    assert sorted(r.indices) == list(range(len(LONG_DOCS)))
    chunks = rr.scorer.builder.chunk_documents(LONG_DOCS)
    assert chunks.counts == [1, 3, 1, 1]
    if order in ("reverse", "input"):  # the chunks as documents, in the same prompt: MaxP by hand
        perm = list(range(4))[::-1] if order == "reverse" else list(range(4))
        texts = [t for j in perm for t, d in zip(chunks.texts, chunks.owner) if d == j]
        S = Reranker(model=lm, method="icr", max_doc_tokens=24).scorer.score(Q, texts, sets=[HeadSet.of(None)])
        at = 0
        want = np.empty(4)
        for j in perm:
            k = chunks.counts[j]
            want[j] = S.sets[0, at:at + k].max().item()
            at += k
        np.testing.assert_allclose(by_doc(r, 4), want, rtol=1e-6)


def test_per_call_setting_and_unchanged_short_lists(lm):
    """max_chunks_per_doc per call overrides the Reranker's (1: truncation); a list with no long document ranks
    and scores as today."""
    trunc = Reranker(model=lm, method="icr", max_doc_tokens=24)
    chunked = Reranker(model=lm, method="icr", max_doc_tokens=24, max_chunks_per_doc=3)
    assert chunked.info()["max_chunks_per_doc"] == 3 and trunc.info()["max_chunks_per_doc"] == 1
    a, b = trunc.rerank(Q, LONG_DOCS), chunked.rerank(Q, LONG_DOCS, max_chunks_per_doc=1)
    assert a.indices == b.indices and a.scores == b.scores
    c, d = trunc.rerank(Q, LONG_DOCS, max_chunks_per_doc=3), chunked.rerank(Q, LONG_DOCS)
    assert c.indices == d.indices and c.scores == d.scores and c.scores != a.scores
    short = [x for x in DOCS if len(x) <= 24]
    s1, s2 = trunc.rerank(Q, short), chunked.rerank(Q, short)
    assert s1.indices == s2.indices and s1.scores == s2.scores
    many = chunked.rerank_many([(Q, LONG_DOCS), ("sky", DOCS)], batch_size=2)
    assert many[0].indices == d.indices and np.allclose(many[0].scores, d.scores, rtol=1e-5)
    out = chunked.rank(Q, LONG_DOCS, top_k=2)
    assert [o["corpus_id"] for o in out] == d.indices[:2] and out[0]["text"] == LONG_DOCS[d.indices[0]]
    with pytest.raises(RouteheadError, match="max_chunks_per_doc"):
        chunked.rerank(Q, LONG_DOCS, max_chunks_per_doc=0)


def test_evidence_and_prompt_tokens_count_the_chunks(lm):
    """Evidence of a chunked document comes from its text; prompt_tokens counts every chunk (an upper bound of the
    tokens run, as for truncated lists) and refuses what rerank refuses."""
    rr = Reranker(model=lm, method="icr", max_doc_tokens=24, max_chunks_per_doc=3)
    r = rr.rerank(Q, LONG_DOCS, evidence=3)
    for i, ev in zip(r.indices, r.evidence):
        assert all(w["text"] in LONG_DOCS[i] for w in ev)
    n_trunc = rr.prompt_tokens(Q, LONG_DOCS, max_chunks_per_doc=1)
    n_chunk = rr.prompt_tokens(Q, LONG_DOCS)
    S = rr.scorer.score(Q, LONG_DOCS[::-1], per_head=False)
    assert n_chunk > n_trunc and n_chunk >= S.prompt_tokens and n_chunk - S.prompt_tokens <= 3 * 6
    both = Reranker(model=lm, method="icr", max_doc_tokens=24, max_chunks_per_doc=3, doc_order="both")
    assert both.prompt_tokens(Q, LONG_DOCS) == 2 * n_chunk
    small = Reranker(model=lm, method="icr", max_doc_tokens=24, max_chunks_per_doc=3, max_prompt_tokens=215)
    with pytest.raises(RouteheadError, match="max_chunks_per_doc"):
        small.prompt_tokens(Q, LONG_DOCS)
    with pytest.raises(RouteheadError, match="max_chunks_per_doc"):
        small.rerank(Q, LONG_DOCS)
