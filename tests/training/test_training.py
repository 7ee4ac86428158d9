"""Pseudo labels, the training objectives and fitting the router (routehead.training)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from routehead.engine.aggregate import spans_of
from routehead.offline.views import Query, doc_scores
from routehead.selection.router import Router, RouterConfig
from routehead.settings import FitSettings
from routehead.training.fit import train_router
from routehead.training.labels import greedy_label, greedy_set, prior_quality
from tests.toys import toy_identity, toy_pool


def _query(signals, gains, qid="q", first_stage=None):
    """A query whose head ``i`` scores document ``d`` ``3 * signals[i][d]`` under the reference aggregation:
    each document is three tokens ``(v, v, v + 1e-3)`` (none masked; a constant document would score 0)."""
    sig = np.asarray(signals, dtype=np.float64)
    n, D = sig.shape
    rows = np.repeat(sig, 3, axis=1)
    rows[:, 2::3] += 1e-3
    gains = np.asarray(gains, dtype=float)
    q = Query(qid, torch.tensor(rows, dtype=torch.float32), spans_of([3] * D), np.zeros((n, D)), gains,
              [g for g in gains if g > 0], first_stage)
    q.single = np.stack([doc_scores(q, [i]) for i in range(n)])
    return q


def test_greedy_label_stops_when_no_gain_and_breaks_ties_by_prior():
    # doc 0 is relevant. signals 1 and 2 both rank it first (tie at nDCG 1); signal 0 ranks it last.
    q = _query([[0, 1, 2], [3, 1, 0], [2, 1, 0]], [1, 0, 0])
    chosen, best = greedy_label(q, prior=np.array([0.9, 0.1, 0.5]))
    assert chosen == [2] and best == 1.0  # tie between 1 and 2 -> higher prior (2); nothing improves on 1.0
    chosen, _ = greedy_label(q, prior=np.array([0.9, 0.6, 0.5]))
    assert chosen == [1]
    # no signal puts the relevant doc in the top 10 -> uninformative, empty label
    q0 = _query([[5] + [0] * 11 + [-1]] * 2, [0] * 12 + [1])
    assert greedy_label(q0, np.array([0.5, 0.5]))[0] == []


def test_greedy_set_is_the_best_set_over_all_queries_and_stops_where_adding_hurts():
    # relevant doc 0 in both; head 1 alone ranks it 2nd on q1 and 1st on q2 (mean 0.815), head 0 the reverse
    # but last on q2 (0.75); heads 0 + 1 rank it first on both; adding head 2 (doc 1 way ahead) would hurt
    q1 = _query([[2, 1, 0], [0.5, 1, 0], [0, 5, 0]], [1, 0, 0], "q1")
    q2 = _query([[0, 1, 0.5], [3, 1, 0], [0, 5, 0]], [1, 0, 0], "q2")
    prior = prior_quality([q1, q2])
    assert greedy_set([q1, q2], prior) == ([1, 0], 1.0)
    # a price on head 0's depth larger than what it adds keeps the set at head 1
    assert greedy_set([q1, q2], prior, cost=np.array([0.3, 0.0, 0.0]))[0] == [1]
    q2.weight = 0.0  # only q1 counts: head 0 alone is perfect there
    assert greedy_set([q1, q2], prior)[0] == [0]


def test_router_learns_query_dependent_heads():
    """Two kinds of query; each has its own good head. The trained router must route by kind."""
    rng = np.random.default_rng(0)
    hidden, n = 8, 4

    def make(kind, i):
        emb = rng.normal(size=hidden) + (3.0 if kind else -3.0) * np.array([1, -1] * (hidden // 2))
        signals = rng.normal(size=(n, 6))
        good = 1 if kind else 2
        signals[good] = np.array([5, 0, 0, 0, 0, 0]) + 0.1 * rng.normal(size=6)
        signals[[i for i in range(n) if i != good]] *= -1  # the wrong head puts doc 0 last more often
        signals[[i for i in range(n) if i != good], 0] = -10
        return emb, _query(signals, [1, 0, 0, 0, 0, 0], f"{kind}-{i}"), good

    data = [make(i % 2, i) for i in range(80)]
    emb = torch.tensor(np.stack([d[0] for d in data]), dtype=torch.float32)
    labels = np.zeros((80, n))
    for i, d in enumerate(data):
        labels[i, d[2]] = 1
    prior = prior_quality([d[1] for d in data])
    assert prior.shape == (n,)
    queries = [d[1] for d in data]
    for objective, weighting in (("bce", "none"), ("listwise", "prob")):
        cfg = RouterConfig(identity=toy_identity(L=2, H=2, hidden=hidden), embed_layer=0, pool=toy_pool(), max_heads=1,
                           weighting=weighting)
        router, hist = train_router(cfg, np.full(n, 0.25), emb[:60], queries[:60], labels[:60], emb[60:],
                                    queries[60:], FitSettings(objective=objective, epochs=200, lr=1e-2,
                                                                eval_every=10, patience=20))
        assert hist[-1]["dev_ndcg@10"] >= hist[0]["dev_ndcg@10"], objective
        assert router.config.training["dev_ndcg@10"] == pytest.approx(1.0), objective
        picks = [router.route(e[None]).heads for e in emb[60:]]
        assert picks == [[(0, 1)] if d[2] == 1 else [(1, 0)] for d in data[60:]], objective


def test_listwise_loss_prefers_the_weighting_that_ranks_relevant_first():
    from routehead.training.objectives import listwise_loss, padded

    q = _query([[2.0, 0.0, -2.0], [-2.0, 0.0, 2.0]], [1, 0, 0])  # head 0 ranks doc 0 first, head 1 last
    b = padded([q])
    good = listwise_loss(torch.tensor([[0.9, 0.1]]), b, 4.0, False)
    bad = listwise_loss(torch.tensor([[0.1, 0.9]]), b, 4.0, False)
    assert good < bad
    # a padded query (longer candidate list beside it) changes nothing for this one
    longer = _query([[1.0, 2.0, 3.0, 4.0], [4.0, 3.0, 2.0, 1.0]], [0, 0, 0, 1], "q2")
    both = padded([q, longer])
    loss2 = listwise_loss(torch.tensor([[0.9, 0.1], [0.5, 0.5]]), both, 4.0, False)
    alone = listwise_loss(torch.tensor([[0.5, 0.5]]), padded([longer]), 4.0, False)
    assert torch.allclose(loss2, (good + alone) / 2, atol=1e-5)


def test_routed_training_scores_equal_inference_aggregation():
    """The differentiable training scores are the inference aggregation of the same weighted set, divided by
    one positive number per query."""
    from routehead.training.objectives import padded, routed_scores

    rng = np.random.default_rng(1)
    q = _query(rng.normal(size=(3, 5)), [1, 0, 0, 0, 1])
    P = torch.tensor([[0.7, 0.2, 0.5]])
    got = routed_scores(P, padded([q]), False)[0].detach().numpy()
    want = doc_scores(q, [0, 1, 2], P[0].numpy())
    assert np.allclose(got * (P[0].numpy() * q.single.std(-1)).sum(), want, atol=1e-4)


def test_expected_layers_run_equals_enumeration():
    """The depth cost is the exact expectation of (deepest routed layer + 1) / L over independent routings."""
    import itertools

    from routehead.training.fit import layers_run
    from routehead.training.objectives import expected_layers_run

    L, pool = 4, [(0, 1), (2, 0), (2, 1), (3, 0)]
    logits = torch.tensor([[0.3, -1.2, 2.0, -0.5], [-3.0, 0.0, -2.0, 1.0]])
    got = expected_layers_run(logits, torch.tensor([a for a, _ in pool]), L)
    p = torch.sigmoid(logits).double()
    for qi in range(2):
        want = 0.0
        for chosen in itertools.product([0, 1], repeat=len(pool)):
            prob = float(np.prod([p[qi, i] if c else 1 - p[qi, i] for i, c in enumerate(chosen)]))
            want += prob * layers_run([h for h, c in zip(pool, chosen) if c], L)
        assert float(got[qi]) == pytest.approx(want, abs=1e-6)


def test_depth_cost_routes_the_shallower_of_two_equal_heads():
    rng = np.random.default_rng(0)
    hidden, docs = 8, 6
    queries, emb = [], []
    for i in range(60):
        good = np.array([5.0, 0, 0, 0, 0, 0]) + 0.1 * rng.normal(size=docs)
        signals = np.stack([rng.normal(size=docs), good, rng.normal(size=docs), good + 0.01])
        queries.append(_query(signals, [1, 0, 0, 0, 0, 0], f"q{i}"))
        emb.append(rng.normal(size=hidden))
    emb = torch.tensor(np.stack(emb), dtype=torch.float32)
    routed = {}
    for cost in (0.0, 1.0):
        cfg = RouterConfig(identity=toy_identity(L=2, H=2, hidden=hidden), embed_layer=0, pool=toy_pool(), max_heads=4,
                           weighting="prob")
        router, hist = train_router(cfg, np.full(4, 0.5), emb[:40], queries[:40], None, emb[40:], queries[40:],
                                    FitSettings(objective="listwise", epochs=300, lr=3e-2, eval_every=10,
                                                  patience=30, depth_cost=cost))
        assert router.config.training["dev_ndcg@10"] == pytest.approx(1.0)
        routed[cost] = {h for e in emb[40:] for h in router.route(e[None]).heads}
    assert (1, 1) in routed[0.0]  # without a cost the deep copy is routed too
    assert routed[1.0] == {(0, 1)}  # with one, only the shallow head: every routed pass stops after layer 0


def test_residual_start_is_the_best_head_net_of_its_price():
    from routehead.training.fit import residual_start

    cfg = RouterConfig(identity=toy_identity(L=4, H=2), embed_layer=0, pool=[[3, 0], [0, 1], [1, 1]],
                       use_first_stage=True)
    prior = np.array([0.70, 0.66, 0.60, 0.50])  # three pool heads, then the first stage
    for cost, best in ((0.0, 0), (0.04, 0), (0.1, 1)):  # 0.70 - 0.1 (all 4 layers) < 0.66 - 0.025 (one layer)
        init = residual_start(prior, cfg, cost)
        assert init.shape == (4,) and np.argmax(init) == best
        assert init[best] == pytest.approx(1 / (1 + np.exp(-2)))
        assert np.allclose(np.delete(init, best), 1 / (1 + np.exp(4)))


def test_routed_values_are_each_querys_own_routing():
    """Per-query out-of-fold values (what paired comparisons of routers use) are each query's own routed nDCG@10,
    count and depth, worked out here by hand, and their means are what selection reports."""
    from routehead.training.fit import routed_ndcg, routed_values

    # doc 0 relevant; signal 0 ranks it last, signals 1-3 first. Pool (0,0), (0,1), (1,0), (1,1); 2 layers.
    q = _query([[0, 1, 2], [3, 1, 0], [2, 1, 0], [2, 1, 0]], [1, 0, 0])
    r = Router(RouterConfig(identity=toy_identity(), embed_layer=0, pool=toy_pool(), threshold=0.5, max_heads=4))
    probs = torch.tensor([[0.9, 0.1, 0.1, 0.1],   # (0,0) alone: doc 0 last; layer 0 only
                          [0.1, 0.9, 0.1, 0.8]])  # (0,1) + (1,1): doc 0 first; both layers
    vals, sizes, depth = routed_values(r, probs, [q, q], 0.5)
    assert vals.tolist() == pytest.approx([1 / np.log2(4), 1.0])  # relevant at rank 3, then rank 1
    assert sizes.tolist() == [1.0, 2.0] and depth.tolist() == [0.5, 1.0]
    assert routed_ndcg(r, probs, [q, q], 0.5) == pytest.approx((vals.mean(), 1.5, 0.75))
