"""A registered method's document scores over stored passes, query by query: what analyses read beside the runs
(calibration fits, position-bias comparisons across prompt orders, score averages of two orders).

The scores are those :func:`routehead.evaluation.runs.method_run` ranks: the method's selection for each query
(from its stored query embedding, when it reads one), aggregated by :func:`routehead.offline.views.selection_scores`
as the live pass aggregates it; candidates in first-stage order.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from routehead.offline.collect import ScoredCollection
from routehead.offline.views import query_embeddings, selection_scores
from routehead.selection.base import Method, Selection


def method_scores(sc: ScoredCollection, method: Method, scorer: Any = None, qids: Sequence[str] | None = None,
                  selections: dict[str, Selection] | None = None) -> dict[str, np.ndarray]:
    """``{qid: document scores}`` of ``method`` for the stored queries ``qids`` (default: all). A method that reads
    the query embedding needs ``scorer`` (embeddings are cached next to the store); ``selections`` collects each
    query's selection."""
    ids = list(qids) if qids is not None else sorted(sc.entries)
    emb = query_embeddings(sc, scorer, *method.embedding, qids=ids) if method.embedding is not None else {}
    out = {}
    for qid in ids:
        sel = method.select(emb.get(qid))
        if selections is not None:
            selections[qid] = sel
        out[qid] = selection_scores(sc, qid, sel)
    return out
