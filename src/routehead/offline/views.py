"""Views over stored forward passes: what training, detection and evaluation read from the store.

A stored query holds every head's calibrated token scores over its candidates (float16 rows with a scale),
their all-heads sum, each head's own document scores and each document's prompt position. These functions
turn one stored query into the inputs of the aggregation (:mod:`routehead.engine.aggregate`), so that every
offline score is computed exactly as the live pass computes it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from routehead.engine.aggregate import Head, SpanIndex, combine, first_stage_signal, set_scores, spans_of
from routehead.errors import RouteheadError
from routehead.offline.collect import ScoredCollection, namespace, store_root
from routehead.offline.store import Tokens, store_path
from routehead.selection.base import Selection


@dataclass
class Query:
    """One query over its candidates: token scores of the pool's heads, their single-head scores, judgments."""

    qid: str
    rows: torch.Tensor  # [pool heads, T] calibrated token scores, documents' spans laid end to end
    spans: SpanIndex
    single: np.ndarray  # [pool heads, docs]: each head alone (== doc_scores of that head)
    gains: np.ndarray  # [docs] judged grade of each candidate (0 if unjudged)
    ideal: list[float]  # grades of all judged relevant documents of the query
    first_stage: np.ndarray | None = None  # [docs], z-scored: the extra signal (index len(pool)) when used
    weight: float = 1.0  # its share of a training objective (:func:`routehead.training.fit.balance_collections`)

    @property
    def num_signals(self) -> int:
        return len(self.rows) + int(self.first_stage is not None)


def doc_scores(q: Query, chosen: list[int], weights: np.ndarray | None = None) -> np.ndarray:
    """Document scores of a selection of signals (pool indices; ``len(pool)`` is the first stage)."""
    P = len(q.rows)
    w = np.ones(len(chosen)) if weights is None else np.asarray(weights, dtype=np.float64)
    heads = [(c, x) for c, x in zip(chosen, w) if c < P]
    fs_w = sum(x for c, x in zip(chosen, w) if c == P)
    attn = None
    if heads:
        attn = set_scores(q.rows[[c for c, _ in heads]], q.spans, [x for _, x in heads])
    return combine(attn, q.first_stage if fs_w else None, fs_w)


def gains(sc: ScoredCollection, qid: str, doc_ids: Sequence[str]) -> tuple[np.ndarray, list[float]]:
    judged = sc.collection.qrels.get(qid, {})
    return np.array([max(judged.get(d, 0), 0) for d in doc_ids], dtype=np.float64), list(judged.values())


def first_stage_scores(sc: ScoredCollection, qid: str) -> np.ndarray:
    top = sc.entries[qid].doc_ids
    fs = dict(sc.first_stage[qid])
    return np.array([fs[d] for d in top], dtype=np.float64)


def tokens_of(sc: ScoredCollection, qid: str) -> Tokens:
    t = sc.entries[qid].tokens
    if t is None:
        raise RouteheadError(f"the store {sc.settings.get('collection')}/{sc.settings.get('split')} has no token "
                             f"scores (made by an older routehead); score the collection again")
    return t


def head_rows(sc: ScoredCollection, qid: str, heads: Sequence[Head]) -> torch.Tensor:
    """float32 token rows ``[len(heads), T]`` of ``heads`` for one stored query."""
    t = tokens_of(sc, qid)
    index = {(int(a), int(b)): i for i, (a, b) in enumerate(t.heads.tolist())}
    missing = [h for h in heads if tuple(h) not in index]
    if missing:
        raise RouteheadError(f"heads {missing[:3]} have no stored token scores")
    return torch.from_numpy(t.decoded([index[tuple(h)] for h in heads]))


def queries_for(sc: ScoredCollection, pool: Sequence[Head], use_first_stage: bool = False,
                qids: Sequence[str] | None = None) -> list[Query]:
    """Label-search / training view of stored queries: the pool's token rows, single-head scores, judgments.
    Documents only: a chunked store (``max_chunks_per_doc`` > 1) is refused, since training aggregates spans as
    documents."""
    out = []
    for qid in qids if qids is not None else sorted(sc.entries):
        e = sc.entries[qid]
        if tokens_of(sc, qid).chunks is not None:
            raise RouteheadError("this store was scored with max_chunks_per_doc > 1 (chunked documents): label "
                                 "search, router training and the oracle read stores of whole (truncated) documents; "
                                 "evaluate methods on it, and train on a store scored with max_chunks_per_doc 1")
        g, ideal = gains(sc, qid, e.doc_ids)
        fs = first_stage_signal(first_stage_scores(sc, qid), len(e.doc_ids)) if use_first_stage else None
        single = np.stack([e.calibrated[lay, h] for lay, h in pool]).astype(np.float64)
        out.append(Query(qid, head_rows(sc, qid, pool), spans_of(tokens_of(sc, qid).counts), single, g, ideal,
                         fs))
    return out


def icr_scores(sc: ScoredCollection, qid: str) -> np.ndarray:
    t = tokens_of(sc, qid)
    return t.document_max(set_scores(torch.from_numpy(t.total)[None], spans_of(t.counts)))


EMBEDDING_FLUSH = 50  # embeddings computed between saves of the cache


def query_embeddings(sc: ScoredCollection, scorer: Any, layer: int, pooling: str = "mean",
                     qids: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
    """Router inputs for the stored queries, cached next to the store (a short pass per query). A merged view
    (:func:`routehead.offline.collect.merge_scored`) reads and fills each member's own cache, under the member's
    query ids, so an embedding is computed once whichever collections it is trained with."""
    from safetensors.torch import load_file, save_file

    want = list(qids) if qids is not None else sorted(sc.entries)
    if sc.members:
        got: dict[str, torch.Tensor] = {}
        for m in sc.members:
            p = namespace(m)
            mine = [q[len(p):] for q in want if q.startswith(p)]
            if mine:
                got.update({p + q: e for q, e in query_embeddings(m, scorer, layer, pooling, mine).items()})
        return {q: got[q] for q in want}
    name = f"emb-{scorer.lm.name}-L{layer}-{pooling}.safetensors".replace("/", "_")
    in_prompt = pooling.startswith("prompt-")
    # a query alone embeds the same in every store of its split; one read off the prompt depends on the store's
    # candidates and their order, so it lives in the store's own folder
    where = store_path(store_root(), sc.settings) if in_prompt else (
        store_root() / sc.collection.name / sc.collection.split)
    path = where / name
    cached = load_file(str(path)) if path.is_file() else {}
    missing = [q for q in want if q not in cached]
    if missing:
        layout = scorer.builder.layout  # the store is keyed by the scorer's prompt settings
        path.parent.mkdir(parents=True, exist_ok=True)
        for i, q in enumerate(missing, 1):
            docs = None
            if in_prompt:
                e = sc.entries[q]
                docs = [sc.collection.prompt_text(e.doc_ids[j], layout)
                        for j in np.argsort(e.tokens.positions, kind="stable")]
            cached[q] = scorer.query_embedding(sc.collection.queries[q], layer, pooling, documents=docs)[None]
            if i % EMBEDDING_FLUSH == 0 or i == len(missing):  # an interrupted run resumes from the last flush
                tmp = path.with_suffix(".tmp")
                save_file({k: v.contiguous() for k, v in cached.items()}, str(tmp))
                tmp.replace(path)
    return {q: cached[q] for q in want}




def selection_scores(sc: ScoredCollection, qid: str, sel: Selection) -> np.ndarray:
    """Document scores of a method's selection for one stored query, aggregated as the live pass aggregates
    it: every head (the stored all-heads sum) or the selected heads' token rows, weighted, masked, summed; then
    the z-scored first stage added with its weight. A chunked document scores its best chunk (MaxP)."""
    if sel.heads.heads is None:
        attn = icr_scores(sc, qid)
    elif sel.heads.heads:
        t = tokens_of(sc, qid)
        attn = t.document_max(set_scores(head_rows(sc, qid, sel.heads.heads), spans_of(t.counts), sel.heads.weights))
    else:
        attn = None
    fs = None
    if sel.first_stage_weight:
        fs = first_stage_signal(first_stage_scores(sc, qid), len(sc.entries[qid].doc_ids))
    return combine(attn, fs, sel.first_stage_weight)
