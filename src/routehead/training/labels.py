"""Pseudo labels by offline search: per training query, the head set that ranks its judged documents best.

Greedy forward selection over a pool of signals (heads, and optionally the first-stage score): start empty,
add the signal whose addition gives the highest nDCG@10 of the set's document scores, stop when no signal
strictly improves nDCG or at ``max_heads``. A set's scores are :func:`routehead.offline.views.doc_scores`,
which aggregates exactly as inference does (heads' token scores summed, then the outlier mask, then the sum over
tokens).

Tie-break (many sets reach the same nDCG when a query has one relevant document): among signals with equal
nDCG, the one with the higher prior wins, the prior being the signal's mean nDCG@10 alone over the training
queries. So a query only leaves the globally good heads when that buys real nDCG. Queries where no signal
ranks any relevant candidate in the top 10 have no informative label and are skipped.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from routehead.engine.aggregate import Head, combine, mask_outliers_and_sum, set_scores
from routehead.metrics import ndcg_at_k
from routehead.offline.views import Query


def _added(q: Query, total: torch.Tensor | None, cand: np.ndarray, fs_on: bool) -> np.ndarray:
    """``[len(cand), docs]``: the scores of the current set plus each candidate signal."""
    P = len(q.rows)
    out = np.zeros((len(cand), q.spans.idx.shape[0]))
    heads = cand[cand < P]
    base = torch.zeros(q.rows.shape[1]) if total is None else total
    if len(heads):
        A = mask_outliers_and_sum(base[None] + q.rows[torch.as_tensor(heads)], q.spans).double().numpy()
        for i, a in zip(np.flatnonzero(cand < P), A):
            out[i] = combine(a, q.first_stage if fs_on else None, 1.0)
    for i in np.flatnonzero(cand == P):  # adding the first stage to the current heads
        attn = None if total is None else set_scores(total[None], q.spans)
        out[i] = combine(attn, q.first_stage, 1.0)
    return out


def prior_quality(queries: list[Query], k: int = 10) -> np.ndarray:
    """Mean nDCG@k of every signal alone over ``queries``: ``[n_signals]`` (the prior)."""
    vals = []
    for q in queries:
        sig = q.single if q.first_stage is None else np.vstack([q.single, q.first_stage[None]])
        vals.append(ndcg_at_k(sig, q.gains, q.ideal, k))
    return np.mean(vals, axis=0)


def greedy_label(q: Query, prior: np.ndarray, max_heads: int = 4, pool: np.ndarray | None = None,
                 k: int = 10) -> tuple[list[int], float]:
    """The greedy signal set for one query and its nDCG@k (empty when the query is uninformative: no signal
    ranks a relevant candidate in the top k)."""
    return greedy_set([q], prior, max_heads, k, pool=pool, floor=0.0)


def greedy_set(queries: list[Query], prior: np.ndarray, max_heads: int = 4, k: int = 10,
               cost: np.ndarray | None = None, pool: np.ndarray | None = None,
               floor: float = -np.inf) -> tuple[list[int], float]:
    """Greedy forward selection of one signal set for all ``queries`` and its value: add the signal (of ``pool``,
    default all) whose addition most raises the mean nDCG@k over the queries (each weighted by its ``weight``),
    less ``cost[s]`` for a set whose costliest signal is s (the price of the layers its pass runs); stop at
    ``max_heads`` or when nothing beats the current value (at first ``floor``). Ties go to the higher prior.
    For one query it is that query's pseudo label; for a training split, the static set a listwise router can
    start from (QRHead's detected set, but searched as a set, so it stops where adding hurts)."""
    cand = np.arange(queries[0].num_signals) if pool is None else np.asarray(pool)
    price = np.zeros(len(cand)) if cost is None else np.asarray(cost, dtype=np.float64)[cand]
    tie = 1e-6 * (prior[cand] - prior.min()) / (np.ptp(prior) + 1e-12)  # < any real nDCG difference
    w = np.array([q.weight for q in queries], dtype=np.float64)
    P = len(queries[0].rows)
    chosen: list[int] = []
    paid = 0.0  # the chosen set's price
    best = floor
    totals: list[torch.Tensor | None] = [None] * len(queries)
    for _ in range(max_heads):
        vals = sum(wj * ndcg_at_k(_added(q, t, cand, P in chosen), q.gains, q.ideal, k)
                   for wj, q, t in zip(w, queries, totals)) / w.sum()
        vals = vals - np.maximum(price, paid)
        vals[np.isin(cand, chosen)] = -np.inf
        i = int(np.argmax(vals + tie))
        if vals[i] <= best + 1e-9:
            break
        c = int(cand[i])
        chosen.append(c)
        best, paid = float(vals[i]), max(paid, float(price[i]))
        if c < P:
            totals = [q.rows[c].clone() if t is None else t + q.rows[c] for q, t in zip(queries, totals)]
    return chosen, best


def label_queries(queries: list[Query], prior: np.ndarray, max_heads: int = 4, pool: np.ndarray | None = None,
                  k: int = 10) -> dict[str, tuple[list[int], float]]:
    """Greedy labels for every informative query: ``qid -> (signal indices, nDCG@k)``."""
    out = {}
    for q in queries:
        chosen, best = greedy_label(q, prior, max_heads, pool, k)
        if chosen:
            out[q.qid] = (chosen, best)
    return out


def save_labels(path: str | Path, labels: dict[str, tuple[list[int], float]], pool: list[Head],
                settings: dict[str, Any]) -> None:
    """Pseudo labels as JSON, each as (layer, head) pairs, with the settings (model, store, search) behind them."""
    P = len(pool)
    body = {"format": "routehead-labels-v2", "settings": settings,
            "labels": {qid: {"heads": [list(pool[i]) for i in chosen if i < P],
                             "first_stage": any(i == P for i in chosen), "ndcg@10": round(float(nd), 6)}
                       for qid, (chosen, nd) in labels.items()}}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(body, indent=1))
