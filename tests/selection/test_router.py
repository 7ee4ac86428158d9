"""Head selection, pseudo labels, the router, its checkpoints, and routed inference."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from routehead.api import Reranker
from routehead.engine.aggregate import HeadSet, mask_outliers_and_sum, set_scores, spans_of
from routehead.engine.order import prompt_order
from routehead.errors import RouteheadError
from routehead.metrics import evaluate_run, ndcg_at_k
from routehead.offline.views import Query, doc_scores
from routehead.selection.heads import load_heads, save_heads
from routehead.selection.router import Router, RouterConfig, load_router
from routehead.settings import FitSettings
from routehead.testing.tiny import tiny_lm
from routehead.training.fit import train_router
from routehead.training.labels import greedy_label, prior_quality

DOCS = ["Amylase digests starch into sugar.", "Paris is in France.", "Lipase digests fat.",
        "Starch is made of glucose.", "The sky is blue."]


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


def test_set_scores_sum_heads_then_mask():
    rows = torch.tensor([[1.0, 2.0, 3.0, -9.0, 0.5, 0.5], [0.5, 0.0, 1.0, 2.0, 1.0, 1.5]])
    spans = spans_of([4, 2])
    want = mask_outliers_and_sum(rows.sum(0, keepdim=True), spans)[0].double().numpy()
    assert np.allclose(set_scores(rows, spans), want)
    assert np.allclose(set_scores(rows, spans, [2.0, 0.0]), mask_outliers_and_sum(2 * rows[:1], spans)[0].numpy())
    # summing first differs from masking each head and then summing (the reason the references sum first)
    per_head = mask_outliers_and_sum(rows, spans).sum(0).double().numpy()
    assert not np.allclose(per_head, want)


def test_head_set_file_round_trip_and_identity(tmp_path):
    ident = {"model": "m", "num_layers": 2, "num_heads": 3}
    save_heads(tmp_path / "h.json", [(0, 1), (1, 2)], ident, prompt={"max_doc_tokens": 50})
    heads, body = load_heads(tmp_path / "h.json", ident)
    assert heads == [(0, 1), (1, 2)] and body["prompt"] == {"max_doc_tokens": 50}
    with pytest.raises(RouteheadError, match="another model"):
        load_heads(tmp_path / "h.json", {**ident, "model": "other"})
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(RouteheadError, match="not a routehead head-set"):
        load_heads(tmp_path / "bad.json")


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


def _identity(L=2, H=2, hidden=8):
    return {"model": "toy", "num_layers": L, "num_heads": H, "hidden_size": hidden}


def _pool(L=2, H=2):
    return [[lay, h] for lay in range(L) for h in range(H)]


def test_router_select_threshold_cap_and_fallback():
    r = Router(RouterConfig(identity=_identity(), embed_layer=0, pool=_pool(), threshold=0.5, max_heads=2))
    assert r.select(np.array([0.9, 0.2, 0.7, 0.6])) == [0, 2]
    assert r.select(np.array([0.1, 0.2, 0.3, 0.05])) == [2]  # none passes: the most probable one
    routing = r.route_probs(torch.tensor([0.9, 0.2, 0.1, 0.8]))  # flat signals 0 and 3: heads (0, 0), (1, 1)
    assert routing.heads == [(0, 0), (1, 1)] and routing.first_stage_weight == 0.0
    fs = Router(RouterConfig(identity=_identity(), embed_layer=0, pool=_pool(), threshold=0.5, max_heads=2,
                             use_first_stage=True))
    only_fs = fs.route_probs(torch.tensor([0.1, 0.3, 0.2, 0.1, 0.9]))  # only the first stage passes
    assert only_fs.first_stage_weight == 1.0 and only_fs.heads == [(0, 1)]  # the most probable head joins it


def test_router_checkpoint_round_trip_and_refusals(tmp_path):
    cfg = RouterConfig(identity=_identity(), embed_layer=1, pool=_pool(), use_first_stage=True)
    r = Router(cfg, prior=np.array([0.5, 0.1, 0.2, 0.3, 0.9]))
    r.save(tmp_path / "r.safetensors")
    back = load_router(tmp_path / "r.safetensors", _identity())
    x = torch.randn(3, 8)
    assert torch.equal(back(x), r(x)) and back.config == r.config
    with pytest.raises(RouteheadError, match="another model"):
        load_router(tmp_path / "r.safetensors", _identity(L=3))
    (tmp_path / "c.safetensors").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(RouteheadError, match="not a valid routehead router"):
        load_router(tmp_path / "c.safetensors")
    with pytest.raises(RouteheadError, match="not found"):
        load_router(tmp_path / "missing.safetensors")


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
        cfg = RouterConfig(identity=_identity(L=2, H=2, hidden=hidden), embed_layer=0, pool=_pool(), max_heads=1,
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


def test_pool_and_probability_weighting():
    cfg = RouterConfig(identity=_identity(L=2, H=2), embed_layer=0, pool=[[0, 1], [1, 0]], threshold=0.3,
                       max_heads=3, weighting="prob")
    r = Router(cfg, prior=np.array([0.6, 0.4]))
    routing = r.route(torch.zeros(1, 8))
    assert routing.signals == [0, 1]
    assert routing.heads == [(0, 1), (1, 0)]  # only pool heads can be routed
    assert np.allclose(routing.weights, routing.signal_weights)
    assert np.allclose(routing.weights, routing.probabilities[[0, 1]].numpy())


@pytest.fixture(scope="module")
def tiny_router_reranker(tmp_path_factory):
    lm = tiny_lm("llama")
    cfg = RouterConfig(identity=lm.identity(), embed_layer=1, pool=_pool(lm.num_layers, lm.num_heads), threshold=0.0,
                       max_heads=3, prompt={"max_doc_tokens": None})
    path = tmp_path_factory.mktemp("r") / "router.safetensors"
    Router(cfg, prior=np.linspace(0.1, 0.9, lm.num_layers * lm.num_heads)).save(path)
    return Reranker(model=lm, method="route", router=path)


def test_routed_scores_equal_selection_over_full_tensor(tiny_router_reranker):
    rr = tiny_router_reranker
    query = "which enzyme digests starch?"
    r = rr.rerank(query, DOCS)
    assert r.heads and max(lay for lay, _ in r.heads) < rr.lm.num_layers
    perm = prompt_order(len(DOCS), "reverse", query)  # the default: best first-stage document last
    full = rr.scorer.score(query, [DOCS[j] for j in perm], sets=[HeadSet.of(r.heads)])  # all heads, no exit
    expected = np.empty(len(DOCS))
    expected[perm] = full.sets[0].double().numpy()
    got = np.empty(len(DOCS))
    got[r.indices] = r.scores
    assert np.allclose(got, expected, atol=1e-5)
    assert r.indices == list(np.argsort(-expected, kind="stable"))


def test_probability_weighted_routing_equals_weighted_selection_over_full_tensor(tmp_path):
    lm = tiny_lm("llama")
    n = lm.num_layers * lm.num_heads
    cfg = RouterConfig(identity=lm.identity(), embed_layer=1, threshold=0.3, max_heads=4, weighting="prob",
                       pool=[[i // lm.num_heads, i % lm.num_heads] for i in range(0, n, 2)],
                       prompt={"max_doc_tokens": None})
    Router(cfg, prior=np.linspace(0.1, 0.9, len(cfg.pool))).save(tmp_path / "r.safetensors")
    rr = Reranker(model=lm, method="route", router=tmp_path / "r.safetensors")
    query = "which enzyme digests starch?"
    r = rr.rerank(query, DOCS)
    routing = rr.route(query)
    assert r.heads == routing.heads
    assert all((lay * lm.num_heads + h) % 2 == 0 for lay, h in r.heads)  # pool respected
    perm = prompt_order(len(DOCS), "reverse", query)
    full = rr.scorer.score(query, [DOCS[j] for j in perm], sets=[HeadSet.of(routing.heads, routing.weights)])
    expected = np.empty(len(DOCS))
    expected[perm] = full.sets[0].double().numpy()
    got = np.empty(len(DOCS))
    got[r.indices] = r.scores
    assert np.allclose(got, expected, atol=1e-5)


def test_router_for_another_model_is_refused(tmp_path):
    lm = tiny_lm("llama")
    cfg = RouterConfig(identity={**lm.identity(), "num_layers": 7}, embed_layer=1, pool=[[0, 0]])
    Router(cfg).save(tmp_path / "r.safetensors")
    with pytest.raises(RouteheadError, match="another model"):
        Reranker(model=lm, method="route", router=tmp_path / "r.safetensors")


def test_rank_is_crossencoder_shaped(tiny_router_reranker):
    out = tiny_router_reranker.rank("starch", DOCS, top_k=2)
    assert len(out) == 2 and set(out[0]) == {"corpus_id", "score", "text"}
    assert out[0]["text"] == DOCS[out[0]["corpus_id"]] and out[0]["score"] >= out[1]["score"]


def test_merged_router_averages_member_logits():
    from routehead.selection.router import merge_routers

    cfg = RouterConfig(identity=_identity(L=2, H=3, hidden=8), embed_layer=0, pool=_pool(2, 3), dim=4)
    members = []
    for seed in range(3):
        torch.manual_seed(seed)
        r = Router(cfg)
        with torch.no_grad():
            for p in r.parameters():
                p.add_(torch.randn_like(p) * 0.5)  # LayerNorm affine too, so the merge must fold it
        members.append(r.eval())
    merged = merge_routers(members)
    emb = torch.randn(5, 8)
    expected = torch.stack([m(emb) for m in members]).mean(0)
    assert merged.config.dim == 12
    assert torch.allclose(merged(emb), expected, atol=1e-5)


def test_rerank_many_equals_one_at_a_time(tiny_router_reranker):
    rr = tiny_router_reranker
    items = [("which enzyme digests starch?", DOCS), ("capital of France", DOCS[:3]), ("sky colour", DOCS[1:])]
    many = rr.rerank_many(items, batch_size=3)
    for (q, docs), r in zip(items, many):
        one = rr.rerank(q, docs)
        assert r.indices == one.indices and r.heads == one.heads
        np.testing.assert_allclose(r.scores, one.scores, rtol=1e-5, atol=1e-7)


def test_evidence_words_come_from_the_document_and_share_its_score(tiny_router_reranker):
    r = tiny_router_reranker.rerank("which enzyme digests starch?", DOCS, evidence=3)
    assert r.evidence is not None and len(r.evidence) == len(DOCS)
    for i, ev in zip(r.indices, r.evidence):
        assert 1 <= len(ev) <= 3
        for w in ev:
            assert w["text"] in DOCS[i] and isinstance(w["share"], float)


def test_both_order_is_the_mean_of_input_and_reverse():
    lm = tiny_lm("llama")
    q = "which enzyme digests starch?"
    got = {o: Reranker(model=lm, method="icr", doc_order=o).rerank(q, DOCS) for o in ("input", "reverse", "both")}

    def by_doc(r):
        out = np.empty(len(DOCS))
        out[r.indices] = r.scores
        return out
    np.testing.assert_allclose(by_doc(got["both"]), (by_doc(got["input"]) + by_doc(got["reverse"])) / 2, rtol=1e-6)


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
        cfg = RouterConfig(identity=_identity(L=2, H=2, hidden=hidden), embed_layer=0, pool=_pool(), max_heads=4,
                           weighting="prob")
        router, hist = train_router(cfg, np.full(4, 0.5), emb[:40], queries[:40], None, emb[40:], queries[40:],
                                    FitSettings(objective="listwise", epochs=300, lr=3e-2, eval_every=10,
                                                  patience=30, depth_cost=cost))
        assert router.config.training["dev_ndcg@10"] == pytest.approx(1.0)
        routed[cost] = {h for e in emb[40:] for h in router.route(e[None]).heads}
    assert (1, 1) in routed[0.0]  # without a cost the deep copy is routed too
    assert routed[1.0] == {(0, 1)}  # with one, only the shallow head: every routed pass stops after layer 0


def test_router_variant_names_resolve_to_shipped_assets(tmp_path, monkeypatch):
    from routehead.assets import asset, router_path

    assert router_path("smollm2-135m", None) == (asset("router-smollm2-135m.safetensors"), True)
    assert router_path("gemma3-270m", "fast") == (asset("router-gemma3-270m-fast.safetensors"), True)
    assert router_path("gemma3-270m", "bce") == (asset("router-gemma3-270m-bce.safetensors"), True)
    assert router_path("x", tmp_path / "r.safetensors") == (tmp_path / "r.safetensors", False)
    with pytest.raises(RouteheadError, match="no 'fast' router shipped for model 'tiny-llama'"):
        Reranker(model=tiny_lm("llama"), router="fast")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "fast").write_bytes(b"")  # a file of that name in the working directory is what the user means
    assert router_path("x", "fast") == (Path("fast"), False)
    with pytest.raises(RouteheadError, match="fast is not a valid routehead router"):
        Reranker(model=tiny_lm("llama"), router="fast")


def test_residual_start_is_the_best_head_net_of_its_price():
    from routehead.training.fit import residual_start

    cfg = RouterConfig(identity=_identity(L=4, H=2), embed_layer=0, pool=[[3, 0], [0, 1], [1, 1]],
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
    r = Router(RouterConfig(identity=_identity(), embed_layer=0, pool=_pool(), threshold=0.5, max_heads=4))
    probs = torch.tensor([[0.9, 0.1, 0.1, 0.1],   # (0,0) alone: doc 0 last; layer 0 only
                          [0.1, 0.9, 0.1, 0.8]])  # (0,1) + (1,1): doc 0 first; both layers
    vals, sizes, depth = routed_values(r, probs, [q, q], 0.5)
    assert vals.tolist() == pytest.approx([1 / np.log2(4), 1.0])  # relevant at rank 3, then rank 1
    assert sizes.tolist() == [1.0, 2.0] and depth.tolist() == [0.5, 1.0]
    assert routed_ndcg(r, probs, [q, q], 0.5) == pytest.approx((vals.mean(), 1.5, 0.75))
