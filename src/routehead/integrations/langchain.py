"""LangChain: routehead as a ``BaseDocumentCompressor``, so it drops into ``ContextualCompressionRetriever``.

Imports come from ``langchain_core`` only (``pip install 'routehead[langchain]'``), so the adapter needs
neither ``langchain`` nor any provider package. Each returned document is a copy of the input with
``relevance_score`` (the name LangChain's other re-rankers use) and this query's ``routed_heads`` /
``head_weights`` added to its metadata, best first, at most ``top_n``.

The retriever's score, when every document carries one in ``metadata[first_stage_key]``, is passed on as
``first_stage_scores`` (routers trained with ``--use-first-stage`` route it as one more signal).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from routehead.integrations import first_stage_scores, ranking_metadata, require, reranker_for

require("langchain_core", "langchain")

from langchain_core.callbacks import Callbacks  # noqa: E402
from langchain_core.documents import BaseDocumentCompressor, Document  # noqa: E402
from pydantic import ConfigDict, PrivateAttr  # noqa: E402

__all__ = ["RouteheadCompressor"]


class RouteheadCompressor(BaseDocumentCompressor):
    """Re-rank retrieved documents with an attention re-ranker (RouteHead, static heads or ICR).

    ``model`` is anything :func:`routehead.integrations.load_reranker` takes: None (the embedded default), a
    name, path or hub id, a ``LoadedModel``, a shared ``Reranker``, or a zero-argument factory. The model is
    loaded on first use, so building a retriever chain stays cheap.
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)

    model: Any = None
    method: str | None = None
    router: str | Path | None = None
    heads: Any = None
    max_doc_tokens: int | None = None
    instruction: str | None = None
    device: str | None = None
    dtype: str | None = None
    layout: str | None = None
    max_chunks_per_doc: int | None = None
    top_n: int | None = 3
    first_stage_key: str | None = "score"

    _reranker: Any = PrivateAttr(default=None)

    @property
    def reranker(self) -> Any:
        """The underlying :class:`routehead.Reranker` (built on first access)."""
        if self._reranker is None:
            self._reranker = reranker_for(self)
        return self._reranker

    def compress_documents(self, documents: Sequence[Document], query: str,
                           callbacks: Callbacks | None = None) -> Sequence[Document]:
        """The ``top_n`` most relevant documents for ``query``, best first, scores and heads in metadata."""
        docs = list(documents)
        if not docs:
            return []
        fs = None
        if self.first_stage_key is not None:
            fs = first_stage_scores([d.metadata.get(self.first_stage_key) for d in docs])
        ranking = self.reranker.rerank(query, [d.page_content for d in docs], first_stage_scores=fs)
        n = len(ranking.indices) if self.top_n is None else max(0, int(self.top_n))
        out = []
        for rank, i in enumerate(ranking.indices[:n]):
            doc = docs[i]
            out.append(Document(page_content=doc.page_content, id=doc.id,
                                metadata={**doc.metadata, **ranking_metadata(ranking, rank)}))
        return out
