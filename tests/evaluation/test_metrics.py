"""Metrics against hand-computed values and ranx, and paired significance tests."""

from __future__ import annotations

import math

import numpy as np
import pytest

from routehead.errors import RouteheadError
from routehead.metrics import compare_runs, evaluate_run, ndcg_at_k, per_query, run_from_ranking

# q1: graded judgements; d9 is relevant but never retrieved, d3 is judged non-relevant (grade 0).
# q2: the system retrieved nothing -> must count as 0, not be dropped.
# q3: the single relevant document at rank 1.
QRELS = {
    "q1": {"d1": 1, "d2": 2, "d3": 0, "d9": 1},
    "q2": {"d5": 1},
    "q3": {"d6": 1},
}
RUN = {
    "q1": {"d3": 0.9, "d2": 0.8, "d1": 0.7, "d4": 0.6},
    "q3": {"d6": 5.0, "d7": 1.0},
    "qX": {"d1": 1.0},  # not judged: ignored
}

L3 = math.log2(3)
# q1 DCG@10 (linear gain, trec_eval): rank1 d3 grade 0 -> 0; rank2 d2 grade 2 -> 2/log2(3);
#    rank3 d1 grade 1 -> 1/log2(4) = 0.5; rank4 d4 unjudged -> 0.       DCG  = 2/log2(3) + 0.5 = 1.76186
# q1 ideal: grades 2, 1, 1 (d9 counts although never retrieved): 2/1 + 1/log2(3) + 1/2 = 3.13093
Q1_NDCG = (2 / L3 + 0.5) / (2 + 1 / L3 + 0.5)  # = 0.562727
NDCG = (Q1_NDCG + 0.0 + 1.0) / 3  # = 0.520909
MRR = (1 / 2 + 0 + 1) / 3  # q1: first relevant at rank 2 -> 1/2
RECALL = (2 / 3 + 0 + 1) / 3  # q1: d1, d2 of {d1, d2, d9}


def test_hand_computed_values() -> None:
    assert Q1_NDCG == pytest.approx(0.562727, abs=1e-6)
    got = evaluate_run(QRELS, RUN, ["ndcg@10", "mrr@10", "recall@10", "recall@100"])
    assert got["ndcg@10"] == pytest.approx(NDCG, abs=1e-12)
    assert got["mrr@10"] == pytest.approx(MRR, abs=1e-12)
    assert got["recall@10"] == pytest.approx(RECALL, abs=1e-12)
    assert got["recall@100"] == pytest.approx(RECALL, abs=1e-12)
    assert set(evaluate_run(QRELS, RUN)) == {"ndcg@10", "mrr@10", "recall@10", "recall@100"}


def test_cutoff_and_burges_gain() -> None:
    # @2 only d3 (grade 0) and d2 (grade 2) are seen; ideal@2 = 2 + 1/log2(3)
    q1 = per_query(QRELS, RUN, "ndcg@2")["q1"]
    assert q1 == pytest.approx((2 / L3) / (2 + 1 / L3), abs=1e-12)
    # exponential gain (2^g - 1) is available under its own name and differs for graded qrels
    burges = per_query(QRELS, RUN, "ndcg_burges@10")["q1"]
    assert burges == pytest.approx((3 / L3 + 0.5) / (3 + 1 / L3 + 0.5), abs=1e-12)


def test_per_query_covers_every_judged_query() -> None:
    got = per_query(QRELS, RUN, "ndcg@10")
    assert list(got) == ["q1", "q2", "q3"]
    assert got["q1"] == pytest.approx(Q1_NDCG) and got["q2"] == 0.0 and got["q3"] == 1.0
    empty = {**RUN, "q2": {}}  # an empty result list is the same as a missing query
    assert per_query(QRELS, empty, "ndcg@10") == got


def test_ties_are_broken_by_doc_id() -> None:
    qrels = {"q": {"a": 1}}
    assert evaluate_run(qrels, {"q": {"b": 1.0, "a": 1.0}}, ["mrr@10"])["mrr@10"] == 1.0
    assert evaluate_run(qrels, {"q": {"a": 1.0, "b": 1.0}}, ["mrr@10"])["mrr@10"] == 1.0
    assert evaluate_run({"q": {"b": 1}}, {"q": {"a": 1.0, "b": 1.0}}, ["mrr@10"])["mrr@10"] == 0.5


def test_run_from_ranking_keeps_list_order() -> None:
    run = run_from_ranking({"q": [("x", 1.0), ("y", 1.0), ("z", 5.0)], "r": ["b", "a"]})
    assert run == {"q": {"x": 3.0, "y": 2.0, "z": 1.0}, "r": {"b": 2.0, "a": 1.0}}
    with pytest.raises(RouteheadError, match="ranked twice"):
        run_from_ranking({"q": ["a", "a"]})


def test_errors() -> None:
    with pytest.raises(RouteheadError):
        evaluate_run({}, RUN)
    with pytest.raises(RouteheadError, match="not supported"):
        evaluate_run(QRELS, RUN, ["foo@3"])


def _significance_fixture(n: int = 40):
    qrels = {f"q{i}": {f"rel{i}": 1} for i in range(n)}
    good = {f"q{i}": {f"rel{i}": 2.0, "junk": 1.0} for i in range(n)}  # relevant doc at rank 1
    bad = {}  # relevant doc at rank 10 (even queries) or rank 6 (odd queries)
    for i in range(n):
        depth = 9 if i % 2 == 0 else 5
        bad[f"q{i}"] = {f"junk{j}": 10.0 - j for j in range(depth)} | {f"rel{i}": 0.0}
    mixed = {q: (good[q] if i % 2 else bad[q]) for i, q in enumerate(qrels)}
    return qrels, {"good": good, "bad": bad, "mixed": mixed}


BAD_NDCG = (1 / math.log2(11) + 1 / math.log2(7)) / 2


@pytest.mark.parametrize("test", ["student", "fisher"])
def test_significance_on_an_obvious_case(test: str) -> None:
    qrels, runs = _significance_fixture()
    out = compare_runs(qrels, runs, baselines=["bad"], metric="ndcg@10", test=test)
    assert out["n_queries"] == 40 and out["metric"] == "ndcg@10"
    assert out["runs"]["good"]["score"] == pytest.approx(1.0)
    assert out["runs"]["bad"]["score"] == pytest.approx(BAD_NDCG)
    assert out["runs"]["bad"]["vs"] == {}  # not compared with itself
    good = out["runs"]["good"]["vs"]["bad"]
    assert good["p_value"] < 0.001 and good["better"] and not good["worse"]
    assert good["delta"] == pytest.approx(1 - BAD_NDCG)
    flipped = compare_runs(qrels, runs, baselines=["good"], test=test)["runs"]["bad"]["vs"]["good"]
    assert flipped["worse"] and not flipped["better"]


def test_identical_runs_are_not_significant_and_fisher_is_deterministic() -> None:
    qrels, runs = _significance_fixture()
    same = compare_runs(qrels, {"a": runs["good"], "b": runs["good"]}, ["a"])
    assert same["runs"]["b"]["vs"]["a"] == {"delta": 0.0, "p_value": 1.0, "better": False, "worse": False}
    # a small, noisy difference: the p-value is a stable number, not a random draw
    qrels2 = {f"q{i}": {"r": 1} for i in range(12)}
    a = {q: {"r": 1.0} for q in qrels2}
    b = {q: ({"r": 1.0} if i % 3 else {"x": 2.0, "r": 1.0}) for i, q in enumerate(qrels2)}
    p1 = compare_runs(qrels2, {"a": a, "b": b}, ["a"], test="fisher")["runs"]["b"]["vs"]["a"]["p_value"]
    p2 = compare_runs(qrels2, {"a": a, "b": b}, ["a"], test="fisher")["runs"]["b"]["vs"]["a"]["p_value"]
    assert p1 == p2 and 0.05 < p1 < 1.0  # 4 of 12 queries lose 0.37: exact two-sided p = 1/8
    assert p1 == pytest.approx(0.125, abs=0.02)
    with pytest.raises(RouteheadError, match="baseline"):
        compare_runs(qrels2, {"a": a}, ["zzz"])
    with pytest.raises(RouteheadError, match="significance test"):
        compare_runs(qrels2, {"a": a}, ["a"], test="wilcoxon")


def test_ndcg_hand_computed():
    # ranking by score: d2 (grade 0), d0 (grade 1), d1 (grade 2); two more relevant docs exist (grades 1, 1)
    scores = np.array([0.5, 0.1, 0.9])
    gains = np.array([1.0, 2.0, 0.0])
    dcg = 0 / np.log2(2) + 1 / np.log2(3) + 2 / np.log2(4)
    idcg = 2 / np.log2(2) + 1 / np.log2(3) + 1 / np.log2(4) + 1 / np.log2(5)
    assert ndcg_at_k(scores, gains, [1, 2, 1, 1]) == pytest.approx(dcg / idcg)
    assert ndcg_at_k(scores, gains, [0, 0]) == 0.0


def test_ndcg_matches_ranx():
    rng = np.random.default_rng(0)
    for _ in range(20):
        scores = rng.normal(size=12)
        gains = rng.integers(0, 3, size=12).astype(float)
        extra = {f"x{i}": int(g) for i, g in enumerate(rng.integers(1, 3, size=2))}  # judged, not retrieved
        qrels = {"q": {**{f"d{i}": int(g) for i, g in enumerate(gains) if g > 0}, **extra}}
        if not any(v > 0 for v in qrels["q"].values()):
            continue
        run = {"q": {f"d{i}": float(s) for i, s in enumerate(scores)}}
        expected = evaluate_run(qrels, run, ["ndcg@10"])["ndcg@10"]
        assert ndcg_at_k(scores, gains, list(qrels["q"].values())) == pytest.approx(expected, abs=1e-9)


def test_order_scores_rank_back_to_the_order():
    from routehead.metrics import order_scores, rank_order

    assert order_scores([2, 0, 1]).tolist() == [2.0, 1.0, 3.0]  # by hand: doc 2 first, then 0, then 1
    for order in ([0], [3, 1, 0, 2], list(range(20))[::-1]):
        assert rank_order(order_scores(order)).tolist() == order
