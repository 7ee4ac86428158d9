"""The Python API: ``Reranker(...).rank(query, documents)``, shaped like sentence-transformers' CrossEncoder.

Methods (all head selections over the same kind of forward pass, aggregated as the references do; they are
registered in :mod:`routehead.selection.registry`, the defaults in :mod:`routehead.settings`):
- ``route``: RouteHead; a router picks this query's heads, only their rows are computed and the
  forward pass stops after the deepest routed layer. Without ``router=``, the router shipped in the package
  for the model.
- ``static``: a fixed head set (QRHead), from ``heads=`` (a JSON file or a list of (layer, head));
  without it, the set shipped for the model.
- ``icr`` (default): all heads (ICR).

Documents are given in first-stage order (best first); ``doc_order`` says where each goes in the prompt
(:mod:`routehead.engine.order`; default: the method's own serving order where its router records one, chosen on
held-out train queries, else ``reverse``, the published runs' order: best last, next to the query).
A score is the method's attention score: the calibrated attention mass (query minus "N/A") the query span
pays to the document's kept tokens, summed over the selected heads; it has the same units for every query
of a method and model. With first-stage scores and a router that routes them, both are standardised over the
list and added.

Long documents: each is cut to ``max_doc_tokens`` (160) by default; with ``max_chunks_per_doc=k`` (> 1, on the
Reranker or per call) a longer one is split into up to k chunks of ``max_doc_tokens`` tokens, each its own passage
in the prompt, and scored by its best chunk (MaxP; :mod:`routehead.engine.prompt`). Results stay per document.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from routehead.engine.aggregate import Head, combine, first_stage_signal
from routehead.engine.evidence import document_evidence
from routehead.engine.layers import stop_when
from routehead.engine.model import DEFAULT_MODEL, LoadedModel, load_model
from routehead.engine.order import passes, prompt_order
from routehead.engine.prompt import layout_of
from routehead.engine.scorer import HeadScorer, HeadScores
from routehead.errors import RouteheadError
from routehead.selection import METHODS, load_method
from routehead.selection.base import Method, Selection
from routehead.selection.router import Router, Routing
from routehead.settings import DEFAULT_LAYOUT, DEFAULT_MAX_DOC_TOKENS, DEFAULT_ORDER, SCORING


@dataclass
class Ranking:
    """One query's ranking: document indices best first, their scores, and the heads that produced them."""

    indices: list[int]
    scores: list[float]
    heads: list[Head] | None = None
    weights: list[float] | None = None  # routed heads' aggregation weights (route only), aligned with heads
    first_stage: bool = False  # whether the first stage (its scores, else the documents' order) was a routed signal
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
                 trust_remote_code: bool = False, doc_order: str | None = None,
                 retrieval_type: str = SCORING.retrieval_type, instruction: str | None = None,
                 layout: str | None = None, max_chunks_per_doc: int = SCORING.max_chunks_per_doc) -> None:
        if doc_order is not None:
            passes(doc_order)  # validates before the model loads
        self.lm = model if isinstance(model, LoadedModel) else load_model(
            model, device=device, dtype=dtype, trust_remote_code=trust_remote_code)
        self.selector: Method = load_method(method, self.lm.identity(), router=router, heads=heads)
        self.method = self.selector.name
        # None: the method's own serving order (its asset's, chosen on held-out train queries), else the default
        self.doc_order = doc_order or self.selector.serving_order or DEFAULT_ORDER
        passes(self.doc_order)
        trained = self.selector.prompt
        if max_doc_tokens is None:
            max_doc_tokens = trained.get("max_doc_tokens", DEFAULT_MAX_DOC_TOKENS)
        trained_layout = layout_of(trained.get("prompt")) if trained else None
        if layout is None:
            layout = trained_layout or DEFAULT_LAYOUT
        elif trained_layout is not None and layout != trained_layout:
            warnings.warn(f"the {self.method} heads were chosen under the {trained_layout!r} prompt layout, not "
                          f"{layout!r}; their scores are not what was measured", stacklevel=2)
        self.scorer = HeadScorer(self.lm, max_doc_tokens=max_doc_tokens, max_prompt_tokens=max_prompt_tokens,
                                 retrieval_type=retrieval_type, instruction=instruction, layout=layout,
                                 max_chunks_per_doc=max_chunks_per_doc)

    @property
    def router(self) -> Router | None:
        """The router of a routing method (None otherwise)."""
        return getattr(self.selector, "router", None)

    @property
    def heads(self) -> list[Head] | None:
        """The head set of a static method (None otherwise)."""
        return getattr(self.selector, "heads", None)

    def info(self) -> dict[str, Any]:
        return {"model": self.lm.name, "method": self.method, "doc_order": self.doc_order,
                **{k: v for k, v in self.lm.identity().items() if k != "model"},
                "prompt": self.scorer.builder.settings(), "max_chunks_per_doc": self.scorer.builder.max_chunks_per_doc,
                **self.selector.info()}

    def route(self, query: str, documents: Sequence[str] | None = None) -> Routing:
        """The router's decision for ``query``: heads, their weights, and the first-stage score's weight. A router
        that reads the query in the re-ranking prompt (pooling ``prompt-*``) needs the ``documents`` too."""
        if self.router is None:
            raise RouteheadError(f"method {self.method!r} routes nothing")
        return self.router.route(self._embedding(query, documents))

    def _embedding(self, query: str, documents: Sequence[str] | None = None) -> Any:
        spec = self.selector.embedding
        if spec is None:
            return None
        if not spec[1].startswith("prompt-"):
            return self.scorer.query_embedding(query, *spec)
        if documents is None:
            raise RouteheadError(f"this router reads the query in the re-ranking prompt ({spec[1]}): pass the "
                                 "documents")
        perm = prompt_order(len(documents), passes(self.doc_order)[0], query)  # as the (first) pass sees them
        return self.scorer.query_embedding(query, *spec, documents=[documents[j] for j in perm])

    def _selection(self, query: str, documents: Sequence[str] | None = None) -> Selection:
        return self.selector.select(self._embedding(query, documents))

    def rerank(self, query: str, documents: Sequence[str], first_stage_scores: Sequence[float] | None = None,
               routed_heads: bool = False, evidence: int = 0, should_stop: Callable[[], bool] | None = None,
               max_chunks_per_doc: int | None = None) -> Ranking:
        """Score and order ``documents`` (first-stage order) for ``query``. ``first_stage_scores`` feed routers
        that route the first stage (without them such a router reads the documents' order as the first stage's
        ranking); ``evidence`` > 0 adds each document's top words by their share of its score (a chunked
        document's: of its best chunk). ``should_stop``, ``max_chunks_per_doc``: see :meth:`rerank_many`."""
        return self.rerank_many([(query, documents, first_stage_scores)], evidence=evidence,
                                should_stop=should_stop, max_chunks_per_doc=max_chunks_per_doc)[0]

    def rerank_many(self, items: Sequence[Item], batch_size: int = SCORING.rerank_batch_size, evidence: int = 0,
                    should_stop: Callable[[], bool] | None = None, max_chunks_per_doc: int | None = None
                    ) -> list[Ranking]:
        """:meth:`rerank` for many ``(query, documents[, first_stage_scores])``, ``batch_size`` prompts per forward
        pass; the same rankings as one at a time.

        ``max_chunks_per_doc``: this call's chunking of long documents (None: the Reranker's; 1: truncation to
        ``max_doc_tokens``; k > 1: up to k chunks each, a document scored by its best chunk).

        ``should_stop``: asked before every decoder layer of every pass of the call (the router's, each window's
        and each order's); once it returns True the call raises :class:`routehead.errors.PassCancelled` at that
        layer boundary, so a caller whose result nobody waits for any more (the service: a client gone, a
        deadline passed) gets the model back within one layer's time. Rankings are unchanged while it is False.
        """
        with stop_when(self.scorer.layers, should_stop):
            return self._rerank_many(items, batch_size, evidence, max_chunks_per_doc)

    def _rerank_many(self, items: Sequence[Item], batch_size: int, evidence: int, max_chunks_per_doc: int | None
                     ) -> list[Ranking]:
        norm = [(it[0], it[1], it[2] if len(it) > 2 else None) for it in items]
        for _, docs, fs in norm:
            if fs is not None and len(fs) != len(docs):
                raise RouteheadError("first_stage_scores must have one score per document")
        routing = self.selector.pass_routing() if len(passes(self.doc_order)) == 1 else None
        if routing is not None and not self.scorer.single_pass:
            routing = None
        # routed inside its own pass where the list fits one prompt; otherwise routed first, then scored
        in_pass = [routing is not None and len(self.scorer.plan(q, docs, max_chunks_per_doc)[2]) == 1
                   for q, docs, _ in norm]
        selections: list[Selection | None] = [None if ip else self._selection(q, docs)
                                              for ip, (q, docs, _) in zip(in_pass, norm)]
        fixed = [sel for sel in selections if sel is not None]
        computed = None if any(sel.heads.heads is None for sel in fixed) else sorted(
            {h for sel in fixed for h in sel.heads.heads})
        sets = list(dict.fromkeys(sel.heads for sel in fixed))
        jobs: dict[bool, list[tuple[str, list[str]]]] = {False: [], True: []}
        where: dict[bool, list[tuple[int, list[int]]]] = {False: [], True: []}
        for i, (q, docs, _) in enumerate(norm):
            for order in passes(self.doc_order):
                perm = prompt_order(len(docs), order, q)
                where[in_pass[i]].append((i, perm))
                jobs[in_pass[i]].append((q, [docs[j] for j in perm]))
        per_item: dict[int, list[tuple[list[int], HeadScores]]] = {}
        for routed, todo in jobs.items():
            if not todo:
                continue
            results = self.scorer.score_many(todo, heads=None if routed else computed, batch_size=batch_size,
                                             sets=() if routed else sets, keep_tokens=evidence > 0, per_head=False,
                                             max_chunks_per_doc=max_chunks_per_doc,
                                             routing=routing if routed else None)
            for (i, perm), S in zip(where[routed], results):
                per_item.setdefault(i, []).append((perm, S))
                if routed:
                    selections[i] = S.routed
        which = [0 if ip else sets.index(sel.heads) for ip, sel in zip(in_pass, selections)]
        out = []
        for i, (_, docs, fs) in enumerate(norm):
            sel = selections[i]
            assert sel is not None
            hs, fs_weight = sel.heads, sel.first_stage_weight
            scores = np.zeros(len(docs))
            for perm, S in per_item[i]:
                scores[perm] += S.sets[which[i]].double().numpy() / len(per_item[i])
            use_fs = fs_weight > 0
            if use_fs:
                scores = combine(scores, first_stage_signal(fs, len(docs)), fs_weight)
            order = np.argsort(-scores, kind="stable")
            ev = None
            if evidence > 0:
                perm, S = per_item[i][0]
                ev_docs = document_evidence(self.lm.tokenizer, S, which[i], evidence)
                at = {doc: j for j, doc in enumerate(perm)}
                ev = [ev_docs[at[int(d)]] for d in order]
            pairs = None if hs.heads is None else list(zip(hs.heads, hs.weights or (None,) * len(hs.heads)))
            if hs.weights is not None:  # routed heads are reported by (layer, head)
                pairs.sort()
            out.append(Ranking(indices=[int(j) for j in order], scores=[float(scores[j]) for j in order],
                               heads=None if pairs is None else [h for h, _ in pairs], first_stage=use_fs,
                               weights=None if hs.weights is None else [w for _, w in pairs], evidence=ev))
        return out

    def prompt_tokens(self, query: str, documents: Sequence[str], max_chunks_per_doc: int | None = None) -> int:
        """Prompt tokens :meth:`rerank` runs through the model for ``query`` and ``documents``, without a forward
        pass: every window's prompt (template, instruction, documents cut to ``max_doc_tokens`` or split into up
        to ``max_chunks_per_doc`` chunks, query) over every ``doc_order`` pass, counted as the scorer plans its
        windows: an upper bound, over by the few tokens the numbering and merges at segment boundaries save (about
        2 a passage a pass). Raises :class:`RouteheadError` where :meth:`rerank` would refuse the input. Safe beside
        a running :meth:`rerank` (every encode holds the tokenizer's lock,
        :func:`routehead.engine.prompt.tokenizer_lock`)."""
        from routehead.engine.prompt import plan_windows

        builder = self.scorer.builder
        q = builder.prepare_query(query)
        chunks = builder.chunk_documents(documents, max_chunks_per_doc)
        fixed = builder.fixed_tokens(0, q)
        per_doc = -(-(builder.fixed_tokens(len(chunks.texts), q) - fixed) // len(chunks.texts))
        of_doc: list[list[int]] = [[] for _ in documents]  # each document's chunk lengths
        for n, d in zip(chunks.lengths, chunks.owner):
            of_doc[d].append(n)
        total = 0
        for order in passes(self.doc_order):
            perm = prompt_order(len(documents), order, query)
            lengths = [n for j in perm for n in of_doc[j]]
            groups = [i for i, j in enumerate(perm) for _ in of_doc[j]]
            for window in plan_windows(lengths, per_doc, fixed, self.scorer.budget, groups=groups):
                total += fixed + sum(lengths[j] + per_doc for j in window)
        return total

    def rank(self, query: str, documents: Sequence[str], top_k: int | None = None, return_documents: bool = True,
             max_chunks_per_doc: int | None = None) -> list[dict[str, Any]]:
        """CrossEncoder.rank-style output: ``[{"corpus_id", "score", "text"?}, ...]`` best first (``text``: the
        whole document, however it was cut or chunked)."""
        r = self.rerank(query, documents, max_chunks_per_doc=max_chunks_per_doc)
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
