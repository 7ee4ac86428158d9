"""Analyses of stored passes that no method needs: how each head's scores follow the prompt position."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from routehead.offline.collect import ScoredCollection
from routehead.offline.views import tokens_of


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
