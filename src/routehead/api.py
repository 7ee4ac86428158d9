"""The Python API: ``Reranker(...).rank(query, documents)``, shaped like sentence-transformers' CrossEncoder.

Methods (all selections over the same per-head tensor S):
- ``route`` (default): RouteHead; a router picks this query's heads, only their rows are computed and the
  forward pass stops after the deepest routed layer. Without ``router=``, the router shipped in the package
  for the default model.
- ``static``: a fixed head set (QRHead-style), from ``heads=`` (a JSON file or a list of (layer, head));
  without it, the set shipped for the default model.
- ``icr``: all heads summed (ICR).
"""

from __future__ import annotations

import importlib.resources
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from routehead.errors import RouteheadError
from routehead.heads import Head, aggregate, load_heads, zscore
from routehead.model import DEFAULT_MODEL, LoadedModel, load_model
from routehead.router import Router, Routing, load_router
from routehead.scorer import HeadScorer

METHODS = ("route", "static", "icr")


def asset(name: str) -> Path:
    """A file shipped inside the package (default router, default static heads)."""
    return Path(str(importlib.resources.files("routehead").joinpath("assets", name)))


def default_router_path(model_name: str) -> Path:
    return asset(f"router-{model_name}.safetensors")


def default_heads_path(model_name: str) -> Path:
    return asset(f"heads-{model_name}.json")


@dataclass
class Ranking:
    """One query's ranking: document indices best first, their scores, and the heads that produced them."""

    indices: list[int]
    scores: list[float]
    heads: list[Head] | None = None
    weights: list[float] | None = None  # routed heads' aggregation weights (route only), aligned with heads
    first_stage: bool = False  # whether the first-stage score was one of the routed signals


class Reranker:
    """Attention-based re-ranker over a frozen causal LM.

    >>> rr = Reranker()                     # RouteHead on the embedded SmolLM2-135M-Instruct
    >>> rr.rank("what is X?", ["doc a", "doc b"], top_k=1)
    [{'corpus_id': 1, 'score': ..., 'text': 'doc b'}]
    """

    def __init__(self, model: str | LoadedModel | None = None, method: str = "route", router: str | Path | None = None,
                 heads: str | Path | Sequence[Head] | None = None, max_doc_tokens: int | None = None,
                 max_prompt_tokens: int | None = None, device: str | None = None, dtype: str | None = None,
                 trust_remote_code: bool = False) -> None:
        if method not in METHODS:
            raise RouteheadError(f"unknown method {method!r}; use one of {METHODS}")
        self.lm = model if isinstance(model, LoadedModel) else load_model(
            model, device=device, dtype=dtype, trust_remote_code=trust_remote_code)
        self.method = method
        self.router: Router | None = None
        self.heads: list[Head] | None = None
        self.norm = "sum"
        identity = self.lm.identity()
        if method == "route":
            path = Path(router) if router is not None else default_router_path(self.lm.name)
            if router is None and not path.is_file():
                raise RouteheadError(f"no router shipped for model {self.lm.name!r}; train one (routehead train) "
                                     f"and pass router=PATH, or use method='static' or 'icr'")
            self.router = load_router(path, identity)
            self.norm = self.router.config.norm
            if max_doc_tokens is None:
                max_doc_tokens = self.router.config.max_doc_tokens
        elif method == "static":
            if heads is None or isinstance(heads, (str, Path)):
                path = Path(heads) if heads is not None else default_heads_path(self.lm.name)
                if heads is None and not path.is_file():
                    raise RouteheadError(f"no head set shipped for model {self.lm.name!r}; detect one "
                                         f"(routehead detect) and pass heads=PATH")
                self.heads, body = load_heads(path, identity)
                self.norm = body.get("norm", "sum")
                if max_doc_tokens is None:
                    max_doc_tokens = body.get("max_doc_tokens")
            else:
                self.heads = sorted((int(a), int(b)) for a, b in heads)
        self.scorer = HeadScorer(self.lm, max_doc_tokens=max_doc_tokens if max_doc_tokens is not None else 300,
                                 max_prompt_tokens=max_prompt_tokens)

    def info(self) -> dict[str, Any]:
        out: dict[str, Any] = {"model": self.lm.name, "method": self.method, "norm": self.norm,
                               **{k: v for k, v in self.lm.identity().items() if k != "model"}}
        if self.heads is not None:
            out["heads"] = [list(h) for h in self.heads]
        if self.router is not None:
            out["router"] = {"embed_layer": self.router.config.embed_layer, "threshold": self.router.config.threshold,
                             "max_heads": self.router.config.max_heads}
        return out

    def route(self, query: str) -> Routing:
        """The router's decision for ``query``: heads, their weights, and the first-stage score's weight."""
        assert self.router is not None
        cfg = self.router.config
        return self.router.route(self.scorer.query_embedding(query, cfg.embed_layer, cfg.pooling))

    def rerank(self, query: str, documents: Sequence[str], first_stage_scores: Sequence[float] | None = None,
               routed_heads: bool = False) -> Ranking:
        """Score and order ``documents`` for ``query``. ``first_stage_scores`` feed routers that use them."""
        fs_weight, weights = 0.0, None
        if self.method == "route":
            routing = self.route(query)
            heads, weights = routing.heads, routing.weights
            if first_stage_scores is not None:  # documented: without them, the routed heads alone decide
                fs_weight = routing.first_stage_weight
        else:
            heads = self.heads  # None for icr: all heads
        if first_stage_scores is not None and len(first_stage_scores) != len(documents):
            raise RouteheadError("first_stage_scores must have one score per document")
        S = self.scorer.score(query, documents, heads=heads)
        scores = aggregate(S.calibrated.numpy(), heads, self.norm, weights)
        use_fs = fs_weight > 0
        if use_fs:
            scores = scores + fs_weight * zscore(np.asarray(first_stage_scores, dtype=np.float64)[None])[0]
        order = np.argsort(-scores, kind="stable")
        return Ranking(indices=[int(i) for i in order], scores=[float(scores[i]) for i in order],
                       heads=list(heads) if heads is not None else None, first_stage=use_fs,
                       weights=list(weights) if weights is not None else None)

    def rank(self, query: str, documents: Sequence[str], top_k: int | None = None, return_documents: bool = True
             ) -> list[dict[str, Any]]:
        """CrossEncoder.rank-style output: ``[{"corpus_id", "score", "text"?}, ...]`` best first."""
        r = self.rerank(query, documents)
        n = len(r.indices) if top_k is None else max(0, int(top_k))
        out = []
        for i, s in zip(r.indices[:n], r.scores[:n]):
            item: dict[str, Any] = {"corpus_id": i, "score": s}
            if return_documents:
                item["text"] = documents[i]
            out.append(item)
        return out

    async def arerank(self, query: str, documents: Sequence[str], **kwargs: Any) -> Ranking:
        """:meth:`rerank` for async callers: runs in a thread, one call at a time per model (``routehead.aio``)."""
        from routehead.aio import arerank

        return await arerank(self, query, documents, **kwargs)

    async def rank_async(self, query: str, documents: Sequence[str], **kwargs: Any) -> list[dict[str, Any]]:
        """:meth:`rank` for async callers, sharing the model safely like :meth:`arerank`."""
        from routehead.aio import arank

        return await arank(self, query, documents, **kwargs)


__all__ = ["DEFAULT_MODEL", "METHODS", "Ranking", "Reranker"]
