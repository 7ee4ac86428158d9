"""The split-judgment oracle against values worked out by hand."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest

from routehead.evaluation.headroom import Headroom, split_oracle


def test_a_head_chosen_on_half_a_is_scored_on_half_b():
    # docs 0 and 1 relevant. Head 0 ranks doc 0 first and doc 1 last; head 1 the reverse; the baseline ranks
    # 0, 1, 2, 3. Whichever half A gets, the head chosen on it puts B's document last of the 3 left (nDCG 1/log2 4)
    # while the baseline puts it first (1.0): selection on one half does not carry to the other.
    per_head = np.array([[3.0, 0.0, 2.0, 1.0], [0.0, 3.0, 2.0, 1.0]])
    baseline = np.array([0.5, 0.4, 0.3, 0.2])
    g = np.array([1.0, 1.0, 0.0, 0.0])
    for seed in range(4):
        got = split_oracle(per_head, baseline, g, np.random.default_rng(seed))
        assert got == pytest.approx((1 / math.log2(4), 1.0))


def test_a_query_with_one_relevant_candidate_gives_nothing():
    assert split_oracle(np.zeros((2, 3)), np.zeros(3), np.array([1.0, 0, 0]), np.random.default_rng(0)) is None


def test_a_head_not_computed_is_never_chosen():
    per_head = np.array([[np.nan] * 4, [0.0, 3.0, 2.0, 1.0]])
    got = split_oracle(per_head, np.array([0.5, 0.4, 0.3, 0.2]), np.array([1.0, 1.0, 0, 0]),
                       np.random.default_rng(0))
    assert got is not None and got[0] in (0.5, 1.0)


def test_headroom_is_a_paired_mean():
    h = Headroom.of([0.5, 0.7, 0.9], [0.4, 0.7, 0.6])
    assert (h.oracle, h.baseline, h.queries) == pytest.approx((0.7, 17 / 30, 3))
    assert h.gain == pytest.approx(0.4 / 3)


def test_routing_diversity_by_hand():
    from routehead.engine.aggregate import HeadSet
    from routehead.evaluation.analysis import routing_diversity
    from routehead.selection.base import Selection

    a, b = Selection(HeadSet.of([(1, 0), (2, 0)])), Selection(HeadSet.of([(1, 0), (3, 1)]))
    got = routing_diversity({"q1": a, "q2": a, "q3": b})
    # pairs: (a, a) distance 0; (a, b) twice: 1 - |{(1,0)}| / |{(1,0),(2,0),(3,1)}| = 2/3
    assert got == {"queries": 3, "distinct_sets": 2, "most_common_share": 2 / 3,
                   "mean_jaccard_distance": pytest.approx((0 + 2 / 3 + 2 / 3) / 3)}
    same = routing_diversity({"q1": a, "q2": Selection(HeadSet.of([(2, 0), (1, 0)]))})
    assert same["distinct_sets"] == 1 and same["mean_jaccard_distance"] == 0.0
    fs = routing_diversity({"q1": a, "q2": Selection(a.heads, first_stage_weight=0.5)})
    assert fs["distinct_sets"] == 2


@pytest.fixture(scope="module")
def mini_store(tmp_path_factory):
    """All ten scifact-mini queries scored by the tiny llama in shuffled order (top 10), in a temporary store."""
    from routehead.engine.scorer import HeadScorer
    from routehead.offline.collect import score_collection
    from routehead.offline.data import load_collection
    from routehead.testing.tiny import tiny_lm

    scorer = HeadScorer(tiny_lm("llama"), max_doc_tokens=24)
    return score_collection(load_collection("examples/scifact-mini", "test"), scorer, scorer.settings(), top_k=10,
                            progress=False, doc_order="shuffle", root=tmp_path_factory.mktemp("store"))


def test_menu_oracle_of_the_baseline_alone_gains_nothing(mini_store):
    from routehead.engine.aggregate import HeadSet
    from routehead.evaluation.headroom import menu_headroom
    from routehead.selection.base import Selection

    sc = _judged(mini_store)
    base = Selection(HeadSet.of([(0, 0), (1, 1)]))
    h = menu_headroom(sc, [base], base, seeds=3)
    assert h.queries >= 1 and h.gain == 0.0
    # a menu holding the baseline can only choose something at least as good on half A, never score NaN
    h2 = menu_headroom(sc, [base, Selection(HeadSet.of(None)), Selection(HeadSet.of([(0, 1)]))], base, 3)
    assert h2.queries == h.queries and np.isfinite(h2.oracle)


def test_cluster_oracle_with_one_cluster_is_the_global_set(mini_store):
    from routehead.evaluation.headroom import cluster_oracle

    rng = np.random.default_rng(0)
    emb = {q: rng.normal(size=8) for q in mini_store.entries}
    one = cluster_oracle(mini_store, emb, clusters=1, top=2, seeds=2, min_size=1)
    assert one.queries == len(mini_store.entries) and one.gain == pytest.approx(0.0, abs=1e-12)
    # clusters too small to fit their own set fall back to the global one
    small = cluster_oracle(mini_store, emb, clusters=2, top=2, seeds=2, min_size=100)
    assert small.gain == pytest.approx(0.0, abs=1e-12)


def _judged(mini_store):
    """scifact-mini with each query's first three candidates judged relevant (it has no query with two)."""
    sc = copy.copy(mini_store)
    sc.collection = copy.copy(mini_store.collection)
    sc.collection.qrels = {q: {d: 1 for d in e.doc_ids[:3]} for q, e in mini_store.entries.items()}
    return sc


def test_gap_scores_the_router_on_the_oracles_own_splits(mini_store):
    from routehead.engine.aggregate import HeadSet
    from routehead.evaluation.headroom import split_judgment_gap, split_judgment_headroom
    from routehead.metrics import rank_order
    from routehead.offline.views import gains, selection_scores
    from routehead.selection.base import Selection

    sc = _judged(mini_store)
    base = Selection(HeadSet.of([(0, 0), (1, 1)]))
    router = Selection(HeadSet.of([(0, 1), (2, 3)]))
    ranking = {q: rank_order(selection_scores(sc, q, router)).tolist() for q in sc.entries}
    gap = split_judgment_gap(sc, base, ranking, seeds=3)
    assert gap.headroom == split_judgment_headroom(sc, [(0, 0), (1, 1)], seeds=3)

    def literal(order: list[int], g: np.ndarray, a: set[int]) -> float:
        # nDCG@10 over the candidates outside half A, judged by half B alone, written out
        left = [d for d in order if d not in a]
        dcg = sum(g[d] / math.log2(r + 2) for r, d in enumerate(left[:10]))
        best = sorted((g[d] for d in left if g[d] > 0), reverse=True)[:10]
        return dcg / sum(x / math.log2(r + 2) for r, x in enumerate(best))

    judged = [q for q in sorted(sc.entries) if (gains(sc, q, sc.entries[q].doc_ids)[0] > 0).sum() >= 2]
    want = []
    for i, q in enumerate(judged):
        g = gains(sc, q, sc.entries[q].doc_ids)[0]
        splits = [np.random.default_rng([s, i]).permutation(np.flatnonzero(g > 0)) for s in range(3)]
        want.append(np.mean([literal(ranking[q], g, set(p[: len(p) // 2].tolist())) for p in splits]))
    assert gap.router.queries == len(judged) == gap.headroom.queries
    assert gap.router.oracle == pytest.approx(float(np.mean(want)))
    assert gap.router.baseline == gap.headroom.baseline
    assert gap.closed == pytest.approx(gap.router.gain / gap.headroom.gain) or gap.headroom.gain <= 0


def test_gap_of_the_baselines_own_order_is_zero(mini_store):
    from routehead.engine.aggregate import HeadSet
    from routehead.errors import RouteheadError
    from routehead.evaluation.headroom import split_judgment_gap
    from routehead.metrics import rank_order
    from routehead.offline.views import selection_scores
    from routehead.selection.base import Selection

    sc = _judged(mini_store)
    base = Selection(HeadSet.of([(0, 0), (1, 1)]))
    ranking = {q: rank_order(selection_scores(sc, q, base)).tolist() for q in sc.entries}
    gap = split_judgment_gap(sc, base, ranking, seeds=2)
    assert gap.router.gain == 0.0 and gap.router.oracle == gap.headroom.baseline
    missing = dict(list(ranking.items())[1:])
    with pytest.raises(RouteheadError, match="no router ranking"):
        split_judgment_gap(sc, base, missing, seeds=1)
    bad = {**ranking, next(iter(ranking)): [0, 0, 1]}
    with pytest.raises(RouteheadError, match="not an order"):
        split_judgment_gap(sc, base, bad, seeds=1)
