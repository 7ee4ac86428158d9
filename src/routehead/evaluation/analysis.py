"""Analyses of stored passes that no method needs: how each head's scores follow the prompt position."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from routehead.offline.collect import ScoredCollection
from routehead.offline.views import tokens_of
from routehead.selection.base import Selection


def position_correlation(sc: ScoredCollection, qids: Sequence[str] | None = None) -> np.ndarray:
    """Per head ``[layers, heads]``: mean Spearman correlation between its scores and the prompt position
    (positive: the head favours documents near the query, i.e. late in the prompt)."""
    from scipy.stats import spearmanr

    vals = []
    for qid in qids if qids is not None else sorted(sc.entries):
        e = sc.entries[qid]
        pos = tokens_of(sc, qid).positions.astype(np.float64)
        L, H, D = e.calibrated.shape
        flat = e.calibrated.reshape(L * H, D)
        r = np.array([spearmanr(x, pos).statistic if np.ptp(x) > 0 else 0.0 for x in flat])
        vals.append(np.nan_to_num(r).reshape(L, H))
    return np.mean(vals, axis=0)


def routing_diversity(selections: dict[str, Selection]) -> dict[str, float]:
    """Whether a router routes (issue #35, item 4): over queries' selections, the number of distinct head sets,
    the share of queries given the most common one, and the mean Jaccard distance between two queries' sets (0:
    every query the same heads, a static set in disguise). The first-stage signal counts as one more member."""
    from collections import Counter
    from itertools import combinations

    sets = [frozenset(map(tuple, s.heads.heads or ())) | ({("first_stage",)} if s.first_stage_weight > 0 else set())
            for s in selections.values()]
    if not sets:
        nan = float("nan")
        return {"queries": 0, "distinct_sets": 0, "most_common_share": nan, "mean_jaccard_distance": nan}
    counts = Counter(sets)
    pairs = list(combinations(sets, 2))
    dist = [1 - len(a & b) / len(a | b) if a | b else 0.0 for a, b in pairs]
    return {"queries": len(sets), "distinct_sets": len(counts),
            "most_common_share": counts.most_common(1)[0][1] / len(sets),
            "mean_jaccard_distance": float(np.mean(dist)) if dist else 0.0}
