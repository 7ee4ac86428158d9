"""Retrieval metrics and paired significance tests, computed with ``ranx``.

Conventions (chosen to match ``trec_eval`` and the published numbers):

* Every query in the qrels counts. A query with no retrieved documents (absent from the run, or an
  empty list) scores 0 instead of being dropped, so a system cannot gain by failing to answer.
  Run entries for queries that are not in the qrels are ignored.
* Relevance grade 0 (and below) is non-relevant; graded judgements use linear gain
  (``ndcg`` = trec_eval's ``ndcg_cut``: gain = grade). Use ``ndcg_burges@k`` for 2^grade - 1.
* Judged documents that the system never retrieved still count in recall and in the ideal DCG.
* Metrics depend only on the order of the documents. Equal scores are ordered by doc id (ascending),
  the same rule :func:`routehead.offline.trec.write_run` uses, so results do not depend on dict order.

``ranx`` compiles its kernels with numba on first use (a few seconds, cached on disk afterwards).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from routehead.errors import RouteheadError

__all__ = [
    "DEFAULT_METRICS",
    "compare_runs",
    "evaluate_run",
    "ndcg_at_k",
    "paired_p_value",
    "per_query",
    "rank_order",
    "run_from_ranking",
]

DEFAULT_METRICS = ("ndcg@10", "mrr@10", "recall@10", "recall@100")

Run = dict[str, dict[str, float]]
Qrels = dict[str, dict[str, int]]


def rank_order(scores: np.ndarray) -> np.ndarray:
    """Indices best first along the last axis; ties keep input (first-stage) order, NaN ranks last."""
    s = np.where(np.isnan(scores), -np.inf, scores)
    return np.argsort(-s, axis=-1, kind="stable")


def order_scores(order: Sequence[int]) -> np.ndarray:
    """Scores whose :func:`rank_order` is ``order`` (candidate indices, best first; earlier is higher, no ties):
    a recorded ranking scored again, e.g. on other judgments, by the same metrics."""
    idx = np.asarray(order, dtype=int)
    scores = np.empty(len(idx))
    scores[idx] = np.arange(len(idx), 0, -1)
    return scores


def ndcg_at_k(scores: np.ndarray, gains: np.ndarray, ideal: Sequence[float], k: int = 10) -> np.ndarray:
    """nDCG@k of one or many score vectors ``[..., docs]`` over the same candidates (trec_eval: linear gain).

    ``gains[d]`` is the judged grade of candidate d (0 if unjudged); ``ideal`` lists the grades of *all* judged
    relevant documents of the query, including those the first stage missed, as ranx and trec_eval do.
    Vectorised because label search and head detection score thousands of selections per query.
    """
    order = rank_order(scores)[..., :k]
    g = np.asarray(gains, dtype=np.float64)[order]
    disc = 1.0 / np.log2(np.arange(2, order.shape[-1] + 2))
    dcg = (g * disc).sum(-1)
    best = np.sort(np.asarray([x for x in ideal if x > 0], dtype=np.float64))[::-1][:k]
    idcg = float((best * (1.0 / np.log2(np.arange(2, len(best) + 2)))).sum())
    return dcg / idcg if idcg > 0 else np.zeros_like(dcg)


def run_from_ranking(ranking: dict[str, Sequence[str] | Sequence[tuple[str, float]]]) -> Run:
    """Turn ranked lists (``[doc_id, ...]`` or ``[(doc_id, score), ...]``, best first) into a run.

    The list order is kept exactly: scores become ``n, n-1, ..., 1``. Use this for first-stage or
    re-ranker output whose order should not be re-derived from (possibly tied) scores.
    """
    run: Run = {}
    for qid, items in ranking.items():
        n = len(items)
        docs: dict[str, float] = {}
        for i, item in enumerate(items):
            did = item if isinstance(item, str) else item[0]
            if did in docs:
                raise RouteheadError(f"query {qid!r}: document {did!r} ranked twice")
            docs[did] = float(n - i)
        run[qid] = docs
    return run


def _check_qrels(qrels: Qrels) -> None:
    if not qrels:
        raise RouteheadError("qrels are empty: nothing to evaluate against")
    for qid, judged in qrels.items():
        if not judged:
            raise RouteheadError(f"qrels for query {qid!r} are empty")


# Stand-in result for a query that retrieved nothing: one unjudged document, so every metric is 0.
# ranx cannot hold an empty result list, and dropping the query would inflate the mean.
_NOTHING = "\x00routehead:no-results"


def _to_ranx(qrels: Qrels, run: Run) -> tuple[Qrels, Run]:
    """Plain-dict inputs for ranx: the run restricted to, and in the same order as, the qrels' queries.

    Scores are replaced by ``n - position`` after sorting by (-score, doc id): the order is what the
    metrics read, and strictly decreasing scores leave ranx no ties to break. Plain dicts (rather than
    ``ranx.Qrels``/``ranx.Run``) avoid numba typed-dict compilation, which costs ~20 s per process;
    ranx pairs queries by position, hence the shared order.
    """
    _check_qrels(qrels)
    q: Qrels = {}
    r: Run = {}
    for qid, judged in qrels.items():
        q[qid] = {did: int(g) for did, g in judged.items()}
        docs = run.get(qid)
        if not docs:
            r[qid] = {_NOTHING: 1.0}
            continue
        for did, score in docs.items():
            if math.isnan(float(score)):
                raise RouteheadError(f"run score of ({qid}, {did}) is NaN")
        ordered = sorted(docs.items(), key=lambda kv: (-float(kv[1]), kv[0]))
        n = len(ordered)
        r[qid] = {did: float(n - i) for i, (did, _) in enumerate(ordered)}
    return q, r


def _evaluate(qrels: Qrels, run: Run, metrics: list[str]) -> dict[str, np.ndarray]:
    """Per-query scores (aligned with ``qrels`` order) for each metric."""
    import warnings

    import ranx

    q, r = _to_ranx(qrels, run)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*unsafe cast.*")  # numba noise inside ranx
        try:
            # ranx returns a dict for several metrics; with return_mean=False and a single metric it
            # fails (looks up the metric without its cutoff), so always ask for at least two.
            out = ranx.evaluate(q, r, metrics if len(metrics) > 1 else metrics * 2, return_mean=False)
        except (ValueError, KeyError, NameError) as exc:
            raise RouteheadError(f"cannot evaluate metrics {metrics}: {exc!r}") from exc
    return {m: np.asarray(out[m], dtype=np.float64) for m in metrics}


def evaluate_run(qrels: Qrels, run: Run, metrics: Sequence[str] = DEFAULT_METRICS) -> dict[str, float]:
    """Mean of each metric over all queries in ``qrels`` (missing queries score 0)."""
    metrics = [metrics] if isinstance(metrics, str) else list(metrics)
    if not metrics:
        raise RouteheadError("no metrics requested")
    scores = _evaluate(qrels, run, metrics)
    return {m: float(scores[m].mean()) for m in metrics}


def per_query(qrels: Qrels, run: Run, metric: str) -> dict[str, float]:
    """The metric for every query in ``qrels`` (in qrels order); missing queries score 0."""
    scores = _evaluate(qrels, run, [metric])[metric]
    return {qid: float(v) for qid, v in zip(qrels, scores)}


def _randomization_p_value(a: np.ndarray, b: np.ndarray, n_permutations: int, seed: int) -> float:
    """Two-sided paired (Fisher) randomization test: randomly swap the two systems' scores per query.

    Implemented here with a seeded numpy generator because ranx's numba-parallel version draws from
    per-thread random states and returns a different p-value on every call. Returns
    ``(hits + 1) / (n_permutations + 1)``, which never reports p = 0 from a finite sample.
    """
    diff = a - b
    observed = abs(diff.mean())
    rng = np.random.default_rng(seed)
    hits = 0
    done = 0
    tol = 1e-12 * max(1.0, observed)  # float noise must not turn an exact tie into a miss
    while done < n_permutations:
        m = min(2000, n_permutations - done)
        signs = rng.integers(0, 2, size=(m, diff.size), dtype=np.int8) * 2 - 1
        permuted = np.abs(signs @ diff) / diff.size
        hits += int(np.count_nonzero(permuted >= observed - tol))
        done += m
    return (hits + 1) / (n_permutations + 1)


def paired_p_value(a: np.ndarray, b: np.ndarray, test: str = "student", n_permutations: int = 10_000,
                   seed: int = 0) -> float:
    """Two-sided p-value of a paired test between two systems' per-query scores (see :func:`compare_runs`)."""
    if np.array_equal(a, b):
        return 1.0  # identical systems; the t statistic is undefined (0/0)
    if test == "student":
        from ranx.statistical_tests import paired_student_t_test

        p, _ = paired_student_t_test(a, b)
        p = float(p)
        return 1.0 if math.isnan(p) else p
    return _randomization_p_value(a, b, n_permutations, seed)


def compare_runs(
    qrels: Qrels,
    runs: dict[str, Run],
    baselines: Sequence[str],
    metric: str = "ndcg@10",
    test: str = "student",
    max_p: float = 0.05,
    n_permutations: int = 10_000,
    seed: int = 0,
) -> dict:
    """Score each run and test it against each baseline with a two-sided paired test over queries.

    ``test`` is ``"student"`` (paired t-test, via ranx/scipy) or ``"fisher"`` (paired randomization
    test with ``n_permutations`` sign flips drawn from ``seed``; deterministic). Returns::

        {"metric": ..., "test": ..., "max_p": ..., "n_queries": ...,
         "runs": {name: {"score": mean,
                         "vs": {baseline: {"delta": mean - baseline mean, "p_value": p,
                                           "better": bool, "worse": bool}}}}}

    ``better``/``worse`` mean significant (p <= max_p) and in that direction. A run is not compared
    with itself. All queries in ``qrels`` take part (missing ones score 0).
    """
    if test not in ("student", "fisher"):
        raise RouteheadError(f"unknown significance test {test!r}; use 'student' or 'fisher'")
    if not 0.0 < max_p < 1.0:
        raise RouteheadError(f"max_p must be in (0, 1), got {max_p}")
    unknown = [b for b in baselines if b not in runs]
    if unknown:
        raise RouteheadError(f"baseline(s) {unknown} not among the runs ({sorted(runs)})")
    qids = list(qrels)
    per = {name: per_query(qrels, run, metric) for name, run in runs.items()}
    arrays = {name: np.array([scores[q] for q in qids], dtype=np.float64) for name, scores in per.items()}
    result: dict = {"metric": metric, "test": test, "max_p": max_p, "n_queries": len(qids), "runs": {}}
    for name, arr in arrays.items():
        vs = {}
        for base in baselines:
            if base == name:
                continue
            barr = arrays[base]
            p = paired_p_value(arr, barr, test, n_permutations, seed)
            delta = float(arr.mean() - barr.mean())
            significant = p <= max_p
            vs[base] = {
                "delta": delta,
                "p_value": p,
                "better": bool(significant and delta > 0),
                "worse": bool(significant and delta < 0),
            }
        result["runs"][name] = {"score": float(arr.mean()), "vs": vs}
    return result
