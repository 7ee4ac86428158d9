"""LangChain adapter: a BaseDocumentCompressor on a tiny random model (and one end-to-end run on the default)."""

from __future__ import annotations

import pytest

pytest.importorskip("langchain_core")

from langchain_core.documents import BaseDocumentCompressor, Document  # noqa: E402

from routehead.integrations.langchain import RouteheadCompressor  # noqa: E402
from tests.integrations.adapters_common import DOCS, FIRST_STAGE, QUERY, expected  # noqa: E402


def _docs(scores=FIRST_STAGE):
    return [Document(page_content=t, metadata={"source": f"d{i}", **({"score": s} if s is not None else {})},
                     id=f"d{i}") for i, (t, s) in enumerate(zip(DOCS, scores))]


def test_compressor_matches_the_reranker_and_routes_the_retriever_score(rr):
    comp = RouteheadCompressor(model=rr, top_n=3)
    assert isinstance(comp, BaseDocumentCompressor)
    docs = _docs()
    out = comp.compress_documents(docs, QUERY)
    want = expected(rr, fs=FIRST_STAGE)
    assert [d.id for d in out] == [f"d{i}" for i in want.indices[:3]]
    assert [d.metadata["relevance_score"] for d in out] == want.scores[:3]
    assert all(d.metadata["routed_heads"] == [list(h) for h in want.heads] for d in out)
    assert out[0].metadata["first_stage_used"] is True and out[0].metadata["source"] == f"d{want.indices[0]}"
    assert "relevance_score" not in docs[0].metadata  # inputs are not modified


def test_without_retriever_scores_the_order_stands_in(rr):
    out = RouteheadCompressor(model=rr, top_n=None).compress_documents(_docs([None] * len(DOCS)), QUERY)
    want = expected(rr)
    assert [d.metadata["relevance_score"] for d in out] == want.scores and len(out) == len(DOCS)
    assert out[0].metadata["first_stage_used"] is True  # the retriever's order, as the Reranker reads it
    assert RouteheadCompressor(model=rr).compress_documents([], QUERY) == []


def test_async_and_callbacks_argument(rr):
    import asyncio

    comp = RouteheadCompressor(model=rr, top_n=2, first_stage_key=None)
    out = asyncio.run(comp.acompress_documents(_docs(), QUERY, callbacks=None))
    assert [d.metadata["relevance_score"] for d in out] == expected(rr).scores[:2]



def test_in_a_contextual_compression_retriever(rr):
    """The chain LangChain users build (ContextualCompressionRetriever now lives in langchain-classic)."""
    retrievers = pytest.importorskip("langchain_classic.retrievers")
    from langchain_core.retrievers import BaseRetriever

    class Fixed(BaseRetriever):
        def _get_relevant_documents(self, query, *, run_manager=None):
            return _docs()

    chain = retrievers.ContextualCompressionRetriever(base_compressor=RouteheadCompressor(model=rr, top_n=2),
                                                      base_retriever=Fixed())
    out = chain.invoke(QUERY)
    assert [d.metadata["relevance_score"] for d in out] == expected(rr, fs=FIRST_STAGE).scores[:2]
