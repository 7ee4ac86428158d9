"""How much a per-query or per-domain head choice could win, measured honestly (issue #35, item 1).

The classic oracle picks each query's best head with that query's own judgments and scores it on the same
judgments. With about one relevant document among 20 candidates and hundreds of heads, some head ranks it first
by chance, so much of that "headroom" is selection noise no router could learn. Two honest versions:

- split-judgment oracle (:func:`split_oracle`): on a query with two or more relevant candidates, the relevant
  ones are split in halves A and B; the head is chosen on A (B's documents left out of the list) and scored on B
  (A's left out), beside a fixed baseline selection scored on B the same way. Averaged over random splits.
- domain oracle (:func:`domain_oracle`): the best static set (QRHead's rule, top 16) chosen on half of a
  collection's queries and scored on the other half, against a global set scored on the same half.
- menu oracle (:func:`menu_headroom`): the split-judgment oracle choosing among a few whole head sets (the
  published methods' selections), the headroom of a router that picks one of a few experts.
- cluster oracle (:func:`cluster_oracle`): static sets per k-means cluster of the router's query embeddings, all
  fitted on one half of the queries, scored on the other.

"Gap closed" by a router is measured against these, never against the classic oracle: :func:`split_judgment_gap`
scores a router on the split-judgment oracle's own halves, so its gain and the oracle's are comparable.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from routehead.engine.aggregate import Head, HeadSet
from routehead.errors import RouteheadError
from routehead.metrics import ndcg_at_k, order_scores, paired_p_value
from routehead.offline.collect import ScoredCollection
from routehead.offline.views import gains, selection_scores
from routehead.selection.base import Selection


def _ndcg_without(scores: np.ndarray, g: np.ndarray, keep: np.ndarray, k: int) -> np.ndarray:
    """nDCG@k of each row of ``scores`` ``[n, docs]`` over the documents ``keep`` only, judged by ``g``."""
    s = np.where(keep, scores, -np.inf)
    return ndcg_at_k(s, np.where(keep, g, 0.0), list(g[keep & (g > 0)]), k)


def split_oracle(per_head: np.ndarray, baseline: np.ndarray, g: np.ndarray, rng: np.random.Generator,
                 k: int = 10) -> tuple[float, float] | None:
    """One random split of one query: (the head chosen on half A, scored on half B; the baseline on B), or None
    when fewer than two candidates are relevant. ``per_head`` ``[heads, docs]`` (NaN rows: not computed),
    ``baseline`` ``[docs]``, ``g`` the candidates' gains. Ties on A go to the lowest head index."""
    rel = np.flatnonzero(g > 0)
    if len(rel) < 2:
        return None
    rel = rng.permutation(rel)
    a, b = rel[: len(rel) // 2], rel[len(rel) // 2:]
    in_a, in_b = np.zeros(len(g), bool), np.zeros(len(g), bool)
    in_a[a], in_b[b] = True, True
    ok = ~np.isnan(per_head).any(-1)
    on_a = np.where(ok, _ndcg_without(np.nan_to_num(per_head), g, ~in_b, k), -np.inf)
    best = int(np.argmax(on_a))
    return (float(_ndcg_without(per_head[best][None], g, ~in_a, k)[0]),
            float(_ndcg_without(baseline[None], g, ~in_a, k)[0]))


@dataclass
class Headroom:
    """A paired comparison over queries: the oracle's and the baseline's mean nDCG@10, the gain, its p-value."""

    oracle: float
    baseline: float
    gain: float
    p_value: float
    queries: int

    @classmethod
    def of(cls, oracle: Sequence[float], baseline: Sequence[float]) -> Headroom:
        a, b = np.asarray(oracle, float), np.asarray(baseline, float)
        if not len(a):  # e.g. no query with two relevant candidates
            return cls(float("nan"), float("nan"), float("nan"), float("nan"), 0)
        p = float(paired_p_value(a, b)) if len(a) > 1 else float("nan")
        return cls(float(a.mean()), float(b.mean()), float((a - b).mean()), p, len(a))


def _judged_twice(sc: ScoredCollection, baseline: Selection,
                  options: Callable[[str], np.ndarray] | None = None
                  ) -> Iterator[tuple[str, np.ndarray, np.ndarray, np.ndarray, list[float]]]:
    """Per stored query with two or more relevant candidates: its id, the options' scores ``[n, docs]``
    (``options(qid)``; default every head's), the baseline selection's ``[docs]``, the candidates' gains and the
    query's judged grades."""
    for qid in sorted(sc.entries):
        e = sc.entries[qid]
        g, ideal = gains(sc, qid, e.doc_ids)
        if (g > 0).sum() >= 2:
            L, H, D = e.calibrated.shape
            per = e.calibrated.reshape(L * H, D) if options is None else options(qid)
            yield qid, per, selection_scores(sc, qid, baseline), g, ideal


def _split_over(judged: Iterator[tuple[str, np.ndarray, np.ndarray, np.ndarray, list[float]]], seeds: int,
                k: int) -> Headroom:
    """:func:`split_oracle` over ``judged`` queries, each query's values averaged over ``seeds`` random splits
    (split s of the i-th judged query drawn by ``default_rng([s, i])``, as :func:`split_judgment_gap` does)."""
    ours, theirs = [], []
    for _, per, base, g, _ in judged:
        got = [split_oracle(per, base, g, np.random.default_rng([s, len(ours)]), k) for s in range(seeds)]
        ours.append(np.mean([x for x, _ in got]))
        theirs.append(np.mean([y for _, y in got]))
    return Headroom.of(ours, theirs)


def split_judgment_headroom(sc: ScoredCollection, baseline: Sequence[Head] | None, seeds: int = 10,
                            k: int = 10) -> Headroom:
    """:func:`split_oracle` over every stored query with two or more relevant candidates, each query's values
    averaged over ``seeds`` random splits; ``baseline``: the fixed head set (None: every head, ICR)."""
    return _split_over(_judged_twice(sc, Selection(HeadSet.of(baseline))), seeds, k)


@dataclass
class Gap:
    """How much of the split-judgment headroom over a baseline a router takes: the oracle against the baseline
    (``headroom``) and the router against the same baseline (``router``), on the same queries and the same random
    splits of their relevant candidates, so that ``closed`` (router gain / headroom gain; NaN where there is no
    headroom) is "gap closed" as issue #35 defines it."""

    headroom: Headroom
    router: Headroom
    closed: float


def split_judgment_gap(sc: ScoredCollection, baseline: Selection, ranking: Mapping[str, Sequence[int]],
                       seeds: int = 10, k: int = 10) -> Gap:
    """:func:`split_judgment_headroom` over ``baseline`` with a router scored beside it: ``ranking[qid]`` is the
    router's order of the stored candidates (indices, best first; e.g. from ``bench/loco.py``, whose router never
    saw ``sc``'s collection), and only that order matters to nDCG, so a router is scored on half B of each split
    exactly as the oracle's head is. Every query with two or more relevant candidates must have a ranking."""
    oracle, base, routed = [], [], []
    for i, (qid, per, b, g, _) in enumerate(_judged_twice(sc, baseline)):
        if qid not in ranking:
            raise RouteheadError(f"no router ranking for query {qid!r} of {sc.collection.name}")
        if sorted(ranking[qid]) != list(range(len(g))):
            raise RouteheadError(f"the router ranking of query {qid!r} is not an order of its {len(g)} candidates")
        r = order_scores(ranking[qid])
        got = [(split_oracle(per, b, g, np.random.default_rng([s, i]), k),
                split_oracle(r[None], b, g, np.random.default_rng([s, i]), k)) for s in range(seeds)]
        oracle.append(np.mean([o[0] for o, _ in got]))
        base.append(np.mean([o[1] for o, _ in got]))
        routed.append(np.mean([x[0] for _, x in got]))
    head, rout = Headroom.of(oracle, base), Headroom.of(routed, base)
    return Gap(head, rout, rout.gain / head.gain if head.gain > 0 else float("nan"))


def classic_headroom(sc: ScoredCollection, baseline: Sequence[Head] | None, k: int = 10) -> Headroom:
    """The in-sample oracle (each query's best single head, chosen and scored on all its judgments) against
    ``baseline``, over the same queries as :func:`split_judgment_headroom`: the optimistic bound."""
    ours, theirs = [], []
    for _, per_head, base, g, ideal in _judged_twice(sc, Selection(HeadSet.of(baseline))):
        ours.append(float(np.max(ndcg_at_k(np.nan_to_num(per_head, nan=-np.inf), g, ideal, k))))
        theirs.append(float(ndcg_at_k(base[None], g, ideal, k)[0]))
    return Headroom.of(ours, theirs)


def domain_oracle(sc: ScoredCollection, global_heads: Sequence[Head], top: int = 16, seeds: int = 5,
                  k: int = 10) -> Headroom:
    """A static set chosen on this collection (QRHead's rule on a random half of its queries) against
    ``global_heads``, both scored on the other half; every query is scored once per seed and direction and its
    values averaged."""
    from routehead.training.detect import detect_heads

    qids = sorted(sc.entries)
    glob = Selection(HeadSet.of(global_heads))
    ours: dict[str, list[float]] = {q: [] for q in qids}
    theirs: dict[str, list[float]] = {q: [] for q in qids}
    for s in range(seeds):
        perm = [qids[i] for i in np.random.default_rng(s).permutation(len(qids))]
        halves = (perm[: len(perm) // 2], perm[len(perm) // 2:])
        for fit, held in (halves, halves[::-1]):
            local = Selection(HeadSet.of(detect_heads(sc, top=top, qids=fit)[0]))
            for q in held:
                g, ideal = gains(sc, q, sc.entries[q].doc_ids)
                ours[q].append(float(ndcg_at_k(selection_scores(sc, q, local)[None], g, ideal, k)[0]))
                theirs[q].append(float(ndcg_at_k(selection_scores(sc, q, glob)[None], g, ideal, k)[0]))
    keep = [q for q in qids if ours[q]]
    return Headroom.of([np.mean(ours[q]) for q in keep], [np.mean(theirs[q]) for q in keep])


def menu_headroom(sc: ScoredCollection, menu: Sequence[Selection], baseline: Selection, seeds: int = 10,
                  k: int = 10) -> Headroom:
    """The split-judgment oracle over a few whole selections instead of single heads: per query, the member of
    ``menu`` (e.g. QRHead-16, CoRe-8, a layer window, the single best head, ICR) that ranks half A best, scored
    on half B, against ``baseline`` on B. This is the headroom of a router that chooses among a few head-set
    experts: sets are far less noisy than single heads, so less of their oracle is selection noise."""
    return _split_over(_judged_twice(sc, baseline, lambda q: np.stack([selection_scores(sc, q, m) for m in menu])),
                       seeds, k)


def cluster_oracle(sc: ScoredCollection, embeddings: dict[str, np.ndarray], clusters: int, top: int = 16,
                   seeds: int = 5, min_size: int = 10, k: int = 10) -> Headroom:
    """Static sets per query cluster, out of sample (issue #35 item 1c): on a random half of the queries, k-means
    on their router embeddings and one set per cluster (QRHead's rule, top ``top``; a cluster smaller than
    ``min_size`` keeps the half's global set); each query of the other half takes its nearest cluster's set.
    Against the global set detected on the same half, scored on the same queries (both out of sample). Every
    query is scored once per seed and direction and its values averaged."""
    from scipy.cluster.vq import kmeans2

    from routehead.training.detect import detect_heads

    qids = sorted(q for q in sc.entries if q in embeddings)
    X = np.stack([np.asarray(embeddings[q], np.float64).reshape(-1) for q in qids])
    X = (X - X.mean(0)) / (X.std(0) + 1e-6)  # every dimension on one scale before k-means
    ours: dict[str, list[float]] = {q: [] for q in qids}
    theirs: dict[str, list[float]] = {q: [] for q in qids}
    for s in range(seeds):
        perm = np.random.default_rng(s).permutation(len(qids))
        halves = (perm[: len(perm) // 2], perm[len(perm) // 2:])
        for fit, held in (halves, halves[::-1]):
            glob = Selection(HeadSet.of(detect_heads(sc, top=top, qids=[qids[i] for i in fit])[0]))
            centroids, label = kmeans2(X[fit], clusters, seed=s, minit="++")
            local = {}
            for c in range(clusters):
                members = [qids[i] for i, lab in zip(fit, label) if lab == c]
                local[c] = (Selection(HeadSet.of(detect_heads(sc, top=top, qids=members)[0]))
                            if len(members) >= min_size else glob)
            nearest = np.argmin(((X[held][:, None] - centroids[None]) ** 2).sum(-1), axis=1)
            for i, c in zip(held, nearest):
                q = qids[i]
                g, ideal = gains(sc, q, sc.entries[q].doc_ids)
                ours[q].append(float(ndcg_at_k(selection_scores(sc, q, local[int(c)])[None], g, ideal, k)[0]))
                theirs[q].append(float(ndcg_at_k(selection_scores(sc, q, glob)[None], g, ideal, k)[0]))
    keep = [q for q in qids if ours[q]]
    return Headroom.of([np.mean(ours[q]) for q in keep], [np.mean(theirs[q]) for q in keep])
