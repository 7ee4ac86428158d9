"""The Python API: ``Reranker(...).rank(query, documents)``, shaped like sentence-transformers' CrossEncoder.

Methods (all head selections over the same kind of forward pass, aggregated as the references do; the
default pairing of method and order is in :mod:`routehead.methods`):
- ``route``: RouteHead; a router picks this query's heads, only their rows are computed and the
  forward pass stops after the deepest routed layer. Without ``router=``, the router shipped in the package
  for the model.
- ``static``: a fixed head set (QRHead), from ``heads=`` (a JSON file or a list of (layer, head));
  without it, the set shipped for the model.
- ``icr`` (default): all heads (ICR).

Documents are given in first-stage order (best first); ``doc_order`` says where each goes in the prompt
(:mod:`routehead.order`; default ``reverse``, the published runs' order: best last, next to the query).
A score is the method's attention score: the calibrated attention mass (query minus "N/A") the query span
pays to the document's kept tokens, summed over the selected heads; it has the same units for every query
of a method and model. With first-stage scores and a router that routes them, both are standardised over the
list and added.
"""

from __future__ import annotations

import importlib.resources
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from routehead.errors import RouteheadError
from routehead.heads import Head, load_heads, zscore
from routehead.labels import combine
from routehead.methods import DEFAULT_ORDER, METHODS, resolve_method
from routehead.model import DEFAULT_MODEL, LoadedModel, load_model
from routehead.order import passes, prompt_order
from routehead.prompt import DEFAULT_LAYOUT, DEFAULT_MAX_DOC_TOKENS, layout_of
from routehead.router import Router, Routing, load_router
from routehead.scorer import HeadScorer, HeadScores, HeadSet


def asset(name: str) -> Path:
    """A file shipped inside the package (default router, default static heads)."""
    return Path(str(importlib.resources.files("routehead").joinpath("assets", name)))


def default_router_path(model_name: str) -> Path:
    return asset(f"router-{model_name}.safetensors")


ROUTER_VARIANTS = ("bce", "fs", "fast")  # routers that may ship beside the default one; pass router="<variant>"


def router_path(model_name: str, router: str | Path | None) -> tuple[Path, bool]:
    """The router file a caller means, and whether it is a shipped asset: ``None`` is the default router, a
    variant name (``"bce"``: the paper's recipe; ``"fs"``: may route the first-stage score; ``"fast"``: a priced,
    shallower router, shipped only where one meets bench/train_router.py's rule, none today) the one shipped
    under it, anything else a path."""
    if router is None:
        return default_router_path(model_name), True
    if isinstance(router, str) and router in ROUTER_VARIANTS and not Path(router).exists():
        return asset(f"router-{model_name}-{router}.safetensors"), True
    return Path(router), False


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
    evidence: list[list[dict[str, Any]]] | None = None  # per ranked document: top words and their share


Item = tuple[str, Sequence[str]] | tuple[str, Sequence[str], Sequence[float] | None]


class Reranker:
    """Attention-based re-ranker over a frozen causal LM.

    >>> rr = Reranker()                     # ICR on the embedded SmolLM2-135M-Instruct
    >>> rr = Reranker(method="route")       # RouteHead with the router shipped for it
    >>> rr = Reranker(router="bce")         # the paper's router, shipped beside it: shallower passes
    >>> rr.rank("what is X?", ["doc a", "doc b"], top_k=1)
    [{'corpus_id': 1, 'score': ..., 'text': 'doc b'}]
    """

    def __init__(self, model: str | LoadedModel | None = None, method: str | None = None,
                 router: str | Path | None = None, heads: str | Path | Sequence[Head] | None = None,
                 max_doc_tokens: int | None = None,
                 max_prompt_tokens: int | None = None, device: str | None = None, dtype: str | None = None,
                 trust_remote_code: bool = False, doc_order: str = DEFAULT_ORDER, retrieval_type: str = "IE",
                 instruction: str | None = None, layout: str | None = None) -> None:
        method = resolve_method(method, router, heads)
        if method not in METHODS:
            raise RouteheadError(f"unknown method {method!r}; use one of {METHODS}")
        passes(doc_order)  # validates
        self.lm = model if isinstance(model, LoadedModel) else load_model(
            model, device=device, dtype=dtype, trust_remote_code=trust_remote_code)
        self.method = method
        self.doc_order = doc_order
        self.router: Router | None = None
        self.heads: list[Head] | None = None
        identity = self.lm.identity()
        trained: dict[str, Any] = {}
        if method == "route":
            path, shipped = router_path(self.lm.name, router)
            if shipped and not path.is_file():
                which = "router" if router is None else f"{router!r} router"
                raise RouteheadError(f"no {which} shipped for model {self.lm.name!r}; train one (routehead train) "
                                     f"and pass router=PATH, or use method='static' or 'icr'")
            self.router = load_router(path, identity)
            trained = self.router.config.prompt
        elif method == "static":
            if heads is None or isinstance(heads, (str, Path)):
                path = Path(heads) if heads is not None else default_heads_path(self.lm.name)
                if heads is None and not path.is_file():
                    raise RouteheadError(f"no head set shipped for model {self.lm.name!r}; detect one "
                                         f"(routehead detect) and pass heads=PATH")
                self.heads, body = load_heads(path, identity)
                trained = body.get("prompt", {})
            else:
                self.heads = sorted((int(a), int(b)) for a, b in heads)
        if max_doc_tokens is None:
            max_doc_tokens = trained.get("max_doc_tokens", DEFAULT_MAX_DOC_TOKENS)
        trained_layout = layout_of(trained.get("prompt")) if trained else None
        if layout is None:
            layout = trained_layout or DEFAULT_LAYOUT
        elif trained_layout is not None and layout != trained_layout:
            warnings.warn(f"the {method} heads were chosen under the {trained_layout!r} prompt layout, not {layout!r}; "
                          "their scores are not what was measured", stacklevel=2)
        self.scorer = HeadScorer(self.lm, max_doc_tokens=max_doc_tokens, max_prompt_tokens=max_prompt_tokens,
                                 retrieval_type=retrieval_type, instruction=instruction, layout=layout)

    def info(self) -> dict[str, Any]:
        out: dict[str, Any] = {"model": self.lm.name, "method": self.method, "doc_order": self.doc_order,
                               **{k: v for k, v in self.lm.identity().items() if k != "model"},
                               "prompt": self.scorer.builder.settings()}
        if self.heads is not None:
            out["heads"] = [list(h) for h in self.heads]
        if self.router is not None:
            out["router"] = {"embed_layer": self.router.config.embed_layer, "threshold": self.router.config.threshold,
                             "max_heads": self.router.config.max_heads, "pool": len(self.router.config.pool)}
        return out

    def route(self, query: str) -> Routing:
        """The router's decision for ``query``: heads, their weights, and the first-stage score's weight."""
        assert self.router is not None
        cfg = self.router.config
        return self.router.route(self.scorer.query_embedding(query, cfg.embed_layer, cfg.pooling))

    def _selection(self, query: str) -> tuple[HeadSet, float]:
        if self.method == "route":
            r = self.route(query)
            return HeadSet.of(r.heads, r.weights), r.first_stage_weight
        return HeadSet.of(self.heads), 0.0

    def rerank(self, query: str, documents: Sequence[str], first_stage_scores: Sequence[float] | None = None,
               routed_heads: bool = False, evidence: int = 0) -> Ranking:
        """Score and order ``documents`` (first-stage order) for ``query``. ``first_stage_scores`` feed routers
        that route them; ``evidence`` > 0 adds each document's top words by their share of its score."""
        return self.rerank_many([(query, documents, first_stage_scores)], evidence=evidence)[0]

    def rerank_many(self, items: Sequence[Item], batch_size: int = 8, evidence: int = 0) -> list[Ranking]:
        """:meth:`rerank` for many ``(query, documents[, first_stage_scores])``, ``batch_size`` prompts per forward
        pass; the same rankings as one at a time."""
        norm = [(it[0], it[1], it[2] if len(it) > 2 else None) for it in items]
        for _, docs, fs in norm:
            if fs is not None and len(fs) != len(docs):
                raise RouteheadError("first_stage_scores must have one score per document")
        selections = [self._selection(q) for q, _, _ in norm]
        computed = None if any(hs.heads is None for hs, _ in selections) else sorted(
            {h for hs, _ in selections for h in hs.heads})
        sets = list(dict.fromkeys(hs for hs, _ in selections))
        which = [sets.index(hs) for hs, _ in selections]
        jobs, where = [], []
        for i, (q, docs, _) in enumerate(norm):
            for order in passes(self.doc_order):
                perm = prompt_order(len(docs), order, q)
                where.append((i, perm))
                jobs.append((q, [docs[j] for j in perm]))
        results = self.scorer.score_many(jobs, heads=computed, batch_size=batch_size, sets=sets,
                                         keep_tokens=evidence > 0, per_head=False)
        per_item: dict[int, list[tuple[list[int], HeadScores]]] = {}
        for (i, perm), S in zip(where, results):
            per_item.setdefault(i, []).append((perm, S))
        out = []
        for i, (_, docs, fs) in enumerate(norm):
            hs, fs_weight = selections[i]
            scores = np.zeros(len(docs))
            for perm, S in per_item[i]:
                scores[perm] += S.sets[which[i]].double().numpy() / len(per_item[i])
            use_fs = fs is not None and fs_weight > 0
            if use_fs:
                scores = combine(scores, zscore(np.asarray(fs, dtype=np.float64)[None])[0], fs_weight)
            order = np.argsort(-scores, kind="stable")
            ev = None
            if evidence > 0:
                perm, S = per_item[i][0]
                ev_docs = document_evidence(self.lm.tokenizer, S, which[i], evidence)
                at = {doc: j for j, doc in enumerate(perm)}
                ev = [ev_docs[at[int(d)]] for d in order]
            out.append(Ranking(indices=[int(j) for j in order], scores=[float(scores[j]) for j in order],
                               heads=list(hs.heads) if hs.heads is not None else None, first_stage=use_fs,
                               weights=list(hs.weights) if hs.weights is not None else None, evidence=ev))
        return out

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


def document_evidence(tokenizer: Any, S: HeadScores, set_index: int, k: int) -> list[list[dict[str, Any]]]:
    """Per document (prompt order): the ``k`` words that carried most of its score, each with its share.

    A word's score is the sum of its tokens' kept (above the outlier threshold) calibrated scores under the
    selected heads, the same numbers the document's score sums; share = word score / the positive score of all
    the document's words (the ``[i]`` marker is not a word of the document and is left out).
    """
    import torch

    from routehead.heads import spans_of

    assert S.set_tokens is not None
    rows = S.set_tokens.rows[set_index]
    spans = spans_of(S.set_tokens.counts)
    out = []
    for d, ids in enumerate(S.token_ids):
        s, e = int(spans.idx[d, 0]), int(spans.idx[d, 0]) + len(ids)
        x = rows[s:e]
        if len(ids) > 1:
            keep = x > x.mean() - 2 * x.std()
        else:
            keep = torch.zeros(len(ids), dtype=torch.bool)
        kept = (x * keep).double()
        words: list[list[Any]] = []
        for tid, val in zip(ids, kept.tolist()):
            piece = tokenizer.decode([tid])
            if not words or piece[:1].isspace() or not piece.strip() or not words[-1][0].strip():
                words.append([piece, val])
            else:
                words[-1][0] += piece
                words[-1][1] += val
        words = [w for w in words if w[0].strip() and not w[0].strip().startswith("[")]
        total = sum(w[1] for w in words if w[1] > 0) or 1.0  # the positive mass the words carry
        top = sorted(words, key=lambda w: -w[1])[:k]
        out.append([{"text": w[0].strip(), "share": round(w[1] / total, 4)} for w in top])
    return out


__all__ = ["DEFAULT_MODEL", "METHODS", "Ranking", "Reranker"]
