"""Pseudo labels by offline search: per training query, the head set that ranks its judged documents best.

Greedy forward selection over a pool of heads: start empty, add the head whose addition gives the highest
nDCG@10 of the aggregated scores, stop when no head strictly improves nDCG or at ``max_heads``. Aggregation is
:func:`routehead.heads.aggregate`'s (the same function inference uses).

Tie-break (many sets reach the same nDCG when a query has one relevant document): among heads with equal
nDCG, the one with the higher prior wins, the prior being the head's mean nDCG@10 alone over the training
queries. So a query only leaves the globally good heads when that buys real nDCG. Queries where no signal
ranks any relevant candidate in the top 10 have no informative label and are skipped.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from routehead.heads import ndcg_at_k, zscore


@dataclass
class Query:
    """One training or evaluation query over its candidates: the signals and the judgments."""

    qid: str
    signals: np.ndarray  # [n_signals, docs]: flat heads (layer * H + head), then the first stage if used
    gains: np.ndarray  # [docs] judged grade of each candidate (0 if unjudged)
    ideal: list[float]  # grades of all judged relevant documents of the query


def signal_matrix(calibrated: np.ndarray, first_stage: np.ndarray | None, norm: str) -> np.ndarray:
    """``[L, H, D]`` (+ first-stage scores ``[D]``) -> ``[n, D]``, normalised as the aggregation requires."""
    x = np.asarray(calibrated, dtype=np.float64).reshape(-1, calibrated.shape[-1])
    x = np.nan_to_num(x, nan=0.0)
    if first_stage is not None:
        if norm != "z":
            raise ValueError("the first-stage signal can only be combined under z-normalisation")
        x = np.vstack([x, np.asarray(first_stage, dtype=np.float64)[None]])
    return zscore(x) if norm == "z" else x


def set_scores(q: Query, chosen: list[int]) -> np.ndarray:
    return q.signals[chosen].sum(0)


def quality(queries: list[Query], k: int = 10) -> np.ndarray:
    """Mean nDCG@k of every signal alone over ``queries``: ``[n_signals]`` (the prior)."""
    return np.mean([ndcg_at_k(q.signals, q.gains, q.ideal, k) for q in queries], axis=0)


def greedy_label(q: Query, prior: np.ndarray, max_heads: int = 4, pool: np.ndarray | None = None,
                 k: int = 10) -> tuple[list[int], float]:
    """The greedy head set for one query and its nDCG@k (empty when the query is uninformative)."""
    cand = np.arange(len(q.signals)) if pool is None else np.asarray(pool)
    tie = 1e-6 * (prior[cand] - prior.min()) / (np.ptp(prior) + 1e-12)  # < any real nDCG difference
    chosen: list[int] = []
    best = 0.0
    total = np.zeros(q.signals.shape[1])
    for _ in range(max_heads):
        vals = ndcg_at_k(total[None] + q.signals[cand], q.gains, q.ideal, k)
        vals[np.isin(cand, chosen)] = -1.0
        i = int(np.argmax(vals + tie))
        if vals[i] <= best + 1e-9:
            break
        chosen.append(int(cand[i]))
        best = float(vals[i])
        total = total + q.signals[cand[i]]
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


def save_labels(path: str | Path, labels: dict[str, tuple[list[int], float]], num_heads: int, num_layers: int,
                settings: dict[str, Any]) -> None:
    """Pseudo labels as JSON, each as (layer, head) pairs, with the settings (model, store, search) behind them."""
    LH = num_layers * num_heads
    body = {"format": "routehead-labels-v1", "settings": settings,
            "labels": {qid: {"heads": [[i // num_heads, i % num_heads] for i in chosen if i < LH],
                             "first_stage": any(i == LH for i in chosen), "ndcg@10": round(float(nd), 6)}
                       for qid, (chosen, nd) in labels.items()}}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(body, indent=1))
