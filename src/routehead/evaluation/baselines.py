"""Baselines that are no head selection, each a function of the stored collection: the first stage (``bm25``),
the prompt position alone (``position``: what position bias gives without reading; later = better), MiniLM
(``dense``), and ``oracle`` (analysis only: each query's greedy label set over a pool, chosen with its own
judgments). Each gives the score function of a collection (query id -> scores of its candidates, in first-stage
order); :func:`routehead.evaluation.runs.evaluate` turns them into runs beside the registered methods. Torch-free
to import, so the CLI can offer their names."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from routehead.offline.collect import ScoredCollection

Head = tuple[int, int]
ScoreFn = Callable[[str], np.ndarray]


def bm25(sc: ScoredCollection, pool: Sequence[Head] | None = None) -> ScoreFn:
    """The first stage's own order (candidates are stored in it)."""
    return lambda q: -np.arange(len(sc.entries[q].doc_ids), dtype=np.float64)


def position(sc: ScoredCollection, pool: Sequence[Head] | None = None) -> ScoreFn:
    from routehead.offline.views import tokens_of

    return lambda q: tokens_of(sc, q).positions.astype(np.float64)


def dense(sc: ScoredCollection, pool: Sequence[Head] | None = None) -> ScoreFn:
    from routehead.offline.dense import dense_scores

    scores = dense_scores(sc)
    return lambda q: scores[q]


def oracle(sc: ScoredCollection, pool: Sequence[Head] | None = None) -> ScoreFn:
    from routehead.offline.views import doc_scores, queries_for
    from routehead.training.detect import detect_heads
    from routehead.training.labels import greedy_label, prior_quality

    pool = pool or detect_heads(sc, 64)[0]
    qs = {q.qid: q for q in queries_for(sc, pool)}
    prior = prior_quality(list(qs.values()))

    def score(qid: str) -> Any:
        chosen, _ = greedy_label(qs[qid], prior)
        return doc_scores(qs[qid], chosen or [int(np.argmax(prior))])
    return score


BASELINES: dict[str, Callable[[ScoredCollection, Sequence[Head] | None], ScoreFn]] = {
    "bm25": bm25, "position": position, "dense": dense, "oracle": oracle}
NO_PASS = ("bm25",)  # baselines that read no stored pass: evaluating only these loads no model
