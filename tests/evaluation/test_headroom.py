"""The split-judgment oracle against values worked out by hand."""

from __future__ import annotations

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
