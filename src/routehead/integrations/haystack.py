"""Haystack: routehead as a ranker component (``pip install 'routehead[haystack]'``).

Shaped like Haystack's similarity rankers: ``run(query, documents, top_k)``, ``warm_up()`` loads the model (a
pipeline calls it before the first run), ``scale_score`` maps scores through a sigmoid (times
``calibration_factor``) to (0, 1), ``score_threshold`` drops documents below it, and ``to_dict``/``from_dict``
round-trip every setting, so the component can be saved and loaded in YAML pipelines. Returned documents are
copies with the new ``score`` and this query's ``routed_heads`` (and ``head_weights``) in ``meta``.

The retriever's ``Document.score``, when every document has one, is passed on as ``first_stage_scores``.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

from routehead.integrations import first_stage_scores, ranking_metadata, require, reranker_for

require("haystack", "haystack")

from haystack import Document, component, default_from_dict, default_to_dict  # noqa: E402

__all__ = ["RouteheadRanker"]


@component
class RouteheadRanker:
    """Re-rank documents with an attention re-ranker (RouteHead, static heads or ICR).

    ``model`` is a name, path or hub id (None: the embedded default) so it serialises; in Python code a
    ``LoadedModel``, a shared ``Reranker`` or a factory also work, but such a component cannot be saved.
    """

    def __init__(self, model: Any = None, method: str | None = None, router: str | None = None,
                 heads: str | list[list[int]] | None = None, max_doc_tokens: int | None = None,
                 instruction: str | None = None, device: str | None = None, dtype: str | None = None,
                 top_k: int = 10, score_threshold: float | None = None, scale_score: bool = True,
                 calibration_factor: float = 1.0, layout: str | None = None,
                 max_chunks_per_doc: int | None = None) -> None:
        if top_k <= 0:
            raise ValueError(f"top_k must be > 0, but got {top_k}")
        if scale_score and calibration_factor is None:
            raise ValueError("scale_score is True, so calibration_factor must be a number")
        self.model = str(model) if isinstance(model, Path) else model
        self.method = method
        self.router = str(router) if router is not None else None
        self.heads = heads
        self.max_doc_tokens = max_doc_tokens
        self.instruction = instruction
        self.device = device
        self.dtype = dtype
        self.layout = layout
        self.max_chunks_per_doc = max_chunks_per_doc
        self.top_k = top_k
        self.score_threshold = score_threshold
        self.scale_score = scale_score
        self.calibration_factor = calibration_factor
        self._reranker: Any = None

    def warm_up(self) -> None:
        """Load the model (once); pipelines call this before their first run."""
        if self._reranker is None:
            self._reranker = reranker_for(self)

    def to_dict(self) -> dict[str, Any]:
        if self.model is not None and not isinstance(self.model, str):
            raise ValueError("RouteheadRanker with a model object cannot be serialised; pass model as a name or path")
        return default_to_dict(self, model=self.model, method=self.method, router=self.router, heads=self.heads,
                               max_doc_tokens=self.max_doc_tokens, instruction=self.instruction, device=self.device,
                               dtype=self.dtype, layout=self.layout, top_k=self.top_k,
                               score_threshold=self.score_threshold, scale_score=self.scale_score,
                               calibration_factor=self.calibration_factor, max_chunks_per_doc=self.max_chunks_per_doc)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RouteheadRanker:
        return default_from_dict(cls, data)

    @component.output_types(documents=list[Document])
    def run(self, query: str, documents: list[Document], top_k: int | None = None,
            score_threshold: float | None = None) -> dict[str, list[Document]]:
        """The ``top_k`` most relevant documents, best first, each with its routehead score."""
        top_k = self.top_k if top_k is None else top_k
        if top_k <= 0:
            raise ValueError(f"top_k must be > 0, but got {top_k}")
        threshold = self.score_threshold if score_threshold is None else score_threshold
        if not documents:
            return {"documents": []}
        self.warm_up()
        fs = first_stage_scores([d.score for d in documents])
        ranking = self._reranker.rerank(query, [d.content or "" for d in documents], first_stage_scores=fs)
        out = []
        for rank, i in enumerate(ranking.indices):
            meta = ranking_metadata(ranking, rank)
            score = meta.pop("relevance_score")
            if self.scale_score:
                score = _sigmoid(score * self.calibration_factor)
            if threshold is not None and score < threshold:
                continue
            doc = documents[i]
            out.append(dataclasses.replace(doc, score=score, meta={**doc.meta, **meta}))
            if len(out) == top_k:
                break
        return {"documents": out}


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))
