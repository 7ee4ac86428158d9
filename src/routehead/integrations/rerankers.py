"""rerankers (AnswerDotAI): routehead as a ``BaseRanker``, results as ``rerankers.results.RankedResults``.

``pip install 'routehead[rerankers]'``. :class:`RouteheadRanker` works wherever rerankers' rankers do
(``rank``/``rank_async``/``score``/``as_langchain_compressor``). rerankers has no public plugin API: its
``rerankers.Reranker(name, model_type=...)`` factory looks the type up in the module-level dict
``rerankers.models.AVAILABLE_RANKERS``. Importing this module adds routehead to that dict under ``"routehead"``
(and ``"RouteheadRanker"``), so after the import::

    from rerankers import Reranker
    import routehead.integrations.rerankers  # registers model_type="routehead"
    ranker = Reranker("smollm2-135m", model_type="routehead", method="route", verbose=0)

The registration relies on that dict staying where it is; :class:`RouteheadRanker` itself does not.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from routehead.integrations import first_stage_scores, load_reranker, ranking_metadata, require

require("rerankers", "rerankers")

from rerankers.documents import Document  # noqa: E402
from rerankers.models.ranker import BaseRanker  # noqa: E402
from rerankers.results import RankedResults, Result  # noqa: E402
from rerankers.utils import prep_docs  # noqa: E402

__all__ = ["MODEL_TYPE", "RouteheadRanker", "register"]

MODEL_TYPE = "routehead"


class RouteheadRanker(BaseRanker):
    """An attention re-ranker (RouteHead, static heads or ICR) with rerankers' interface.

    ``model_name_or_path`` is a name, path or hub id (None or ``"routehead"``: the embedded default); ``model``,
    when given, overrides it with anything :func:`routehead.integrations.load_reranker` takes (a ``LoadedModel``,
    a shared ``Reranker``, a factory). Each result's document metadata gets this query's ``routed_heads``.
    """

    def __init__(self, model_name_or_path: str | None = None, verbose: int = 1, method: str | None = None,
                 router: str | None = None, heads: Any = None, max_doc_tokens: int | None = None,
                 instruction: str | None = None, device: str | None = None, dtype: str | None = None,
                 model: Any = None, layout: str | None = None, max_chunks_per_doc: int | None = None,
                 **kwargs: Any) -> None:
        if kwargs:
            raise TypeError(f"RouteheadRanker got unexpected settings {sorted(kwargs)}")
        spec = model if model is not None else (
            None if model_name_or_path in (None, MODEL_TYPE) else model_name_or_path)
        self.verbose = verbose
        self.reranker = load_reranker(spec, method=method, router=router, heads=heads, max_doc_tokens=max_doc_tokens,
                                      instruction=instruction, device=device, dtype=dtype,
                                      layout=layout, max_chunks_per_doc=max_chunks_per_doc)

    def rank(self, query: str, docs: str | list[str] | Document | list[Document],
             doc_ids: list[str] | list[int] | None = None, metadata: list[dict] | None = None,
             first_stage_scores: Sequence[float] | None = None) -> RankedResults:
        """Rank ``docs`` for ``query``: results best first with ``score`` and 1-based ``rank``.

        ``first_stage_scores`` (one per document, the retriever's) is routehead's extra; without it, a
        document's ``metadata["score"]`` is used when every document has one.
        """
        if isinstance(docs, list) and not docs:
            return RankedResults(results=[], query=query, has_scores=True)
        documents = prep_docs(docs, doc_ids, metadata)
        fs = list(first_stage_scores) if first_stage_scores is not None else \
            _first_stage_from_metadata(documents)
        ranking = self.reranker.rerank(query, [d.text for d in documents], first_stage_scores=fs)
        results = []
        for rank, i in enumerate(ranking.indices):
            doc = documents[i]
            meta = ranking_metadata(ranking, rank)
            score = meta.pop("relevance_score")
            out = Document(text=doc.text, doc_id=doc.doc_id, metadata={**doc.metadata, **meta})
            results.append(Result(document=out, score=score, rank=rank + 1))
        return RankedResults(results=results, query=query, has_scores=True)

    def score(self, query: str, doc: str) -> float:
        """One document's score on its own. Attention scores are relative to the other candidates (and
        ``z``-normalised routers give a lone document 0), so prefer :meth:`rank` over a list."""
        return float(self.rank(query, [doc]).results[0].score)


def _first_stage_from_metadata(documents: list[Document]) -> list[float] | None:
    if not all("score" in d.metadata for d in documents):
        return None
    return first_stage_scores([d.metadata["score"] for d in documents])


def register() -> None:
    """Make ``rerankers.Reranker(..., model_type="routehead")`` build a :class:`RouteheadRanker`."""
    from rerankers.models import AVAILABLE_RANKERS

    AVAILABLE_RANKERS[MODEL_TYPE] = RouteheadRanker
    AVAILABLE_RANKERS[RouteheadRanker.__name__] = RouteheadRanker


register()
