"""Baselines that are no head selection, each a function of the stored collection: the first stage (``bm25``),
the prompt position alone (``position``: what position bias gives without reading; later = better), MiniLM
(``dense``), and ``oracle`` (analysis only: each query's greedy label set over a pool, chosen with its own
judgments). :func:`routehead.evaluation.runs.evaluate` dispatches them with the registered methods. Torch-free
to import, so the CLI can offer their names."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from routehead.offline.collect import ScoredCollection

Head = tuple[int, int]
Run = dict[str, dict[str, float]]


def bm25(sc: ScoredCollection, pool: Sequence[Head] | None = None) -> Run:
    from routehead.metrics import run_from_ranking

    return run_from_ranking({q: [d for d, _ in c] for q, c in sc.first_stage.items()})


def position(sc: ScoredCollection, pool: Sequence[Head] | None = None) -> Run:
    from routehead.evaluation.runs import run_of
    from routehead.offline.views import tokens_of

    return run_of(sc, lambda q: tokens_of(sc, q).positions.astype(np.float64))


def dense(sc: ScoredCollection, pool: Sequence[Head] | None = None) -> Run:
    from routehead.evaluation.runs import run_of
    from routehead.offline.dense import dense_scores

    scores = dense_scores(sc)
    return run_of(sc, lambda q: scores[q])


def oracle(sc: ScoredCollection, pool: Sequence[Head] | None = None) -> Run:
    from routehead.evaluation.runs import run_of
    from routehead.offline.views import doc_scores, queries_for
    from routehead.training.detect import detect_heads
    from routehead.training.labels import greedy_label, prior_quality

    pool = pool or detect_heads(sc, 64)[0]
    qs = {q.qid: q for q in queries_for(sc, pool)}
    prior = prior_quality(list(qs.values()))

    def score(qid: str) -> Any:
        chosen, _ = greedy_label(qs[qid], prior)
        return doc_scores(qs[qid], chosen or [int(np.argmax(prior))])
    return run_of(sc, score)


BASELINES: dict[str, Callable[[ScoredCollection, Sequence[Head] | None], Run]] = {
    "bm25": bm25, "position": position, "dense": dense, "oracle": oracle}
NO_PASS = ("bm25",)  # baselines that read no stored pass: evaluating only these loads no model
