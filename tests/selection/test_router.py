"""Head sets, the router, its checkpoints, and routed inference (routehead.selection)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from routehead.api import Reranker
from routehead.engine.aggregate import HeadSet, mask_outliers_and_sum, set_scores, spans_of
from routehead.engine.order import prompt_order
from routehead.errors import RouteheadError
from routehead.selection.heads import load_heads, save_heads
from routehead.selection.router import Router, RouterConfig, load_router
from routehead.testing.tiny import tiny_lm
from tests.toys import DOCS, toy_identity, toy_pool


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


def test_router_select_threshold_cap_and_fallback():
    r = Router(RouterConfig(identity=toy_identity(), embed_layer=0, pool=toy_pool(), threshold=0.5, max_heads=2))
    assert r.select(np.array([0.9, 0.2, 0.7, 0.6])) == [0, 2]
    assert r.select(np.array([0.1, 0.2, 0.3, 0.05])) == [2]  # none passes: the most probable one
    routing = r.route_probs(torch.tensor([0.9, 0.2, 0.1, 0.8]))  # flat signals 0 and 3: heads (0, 0), (1, 1)
    assert routing.heads == [(0, 0), (1, 1)] and routing.first_stage_weight == 0.0
    fs = Router(RouterConfig(identity=toy_identity(), embed_layer=0, pool=toy_pool(), threshold=0.5, max_heads=2,
                             use_first_stage=True))
    only_fs = fs.route_probs(torch.tensor([0.1, 0.3, 0.2, 0.1, 0.9]))  # only the first stage passes
    assert only_fs.first_stage_weight == 1.0 and only_fs.heads == [(0, 1)]  # the most probable head joins it


def test_router_checkpoint_round_trip_and_refusals(tmp_path):
    cfg = RouterConfig(identity=toy_identity(), embed_layer=1, pool=toy_pool(), use_first_stage=True)
    r = Router(cfg, prior=np.array([0.5, 0.1, 0.2, 0.3, 0.9]))
    r.save(tmp_path / "r.safetensors")
    back = load_router(tmp_path / "r.safetensors", toy_identity())
    x = torch.randn(3, 8)
    assert torch.equal(back(x), r(x)) and back.config == r.config
    with pytest.raises(RouteheadError, match="another model"):
        load_router(tmp_path / "r.safetensors", toy_identity(L=3))
    (tmp_path / "c.safetensors").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(RouteheadError, match="not a valid routehead router"):
        load_router(tmp_path / "c.safetensors")
    with pytest.raises(RouteheadError, match="not found"):
        load_router(tmp_path / "missing.safetensors")


def test_pool_and_probability_weighting():
    cfg = RouterConfig(identity=toy_identity(L=2, H=2), embed_layer=0, pool=[[0, 1], [1, 0]], threshold=0.3,
                       max_heads=3, weighting="prob")
    r = Router(cfg, prior=np.array([0.6, 0.4]))
    routing = r.route(torch.zeros(1, 8))
    assert routing.signals == [0, 1]
    assert routing.heads == [(0, 1), (1, 0)]  # only pool heads can be routed
    assert np.allclose(routing.weights, routing.signal_weights)
    assert np.allclose(routing.weights, routing.probabilities[[0, 1]].numpy())


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


def test_merged_router_averages_member_logits():
    from routehead.selection.router import merge_routers

    cfg = RouterConfig(identity=toy_identity(L=2, H=3, hidden=8), embed_layer=0, pool=toy_pool(2, 3), dim=4)
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


def test_shipped_multi_router_never_saw_scifact_test():
    """The multi-collection router (bench/loco.py): trained on scifact train and the five other collections, never
    on scifact test (its one test collection), with the first-stage recipe it was registered with."""
    from routehead.assets import router_path
    from routehead.selection.router import load_router

    path, shipped = router_path("smollm2-135m", "multi")
    cfg = load_router(path).config
    assert shipped and cfg.identity["model"] == "smollm2-135m" and cfg.use_first_stage
    assert cfg.trained_on[0] == "scifact/train" and "scifact/test" not in cfg.trained_on
    assert sorted(cfg.trained_on[1:]) == ["adi/test", "cisi/test", "cranfield/test", "med/test",
                                          "trec-dl19-passage/test"]


def test_default_router_routes_inside_the_pass_within_the_depth_budget_and_never_saw_scifact_test():
    """SmolLM2's default router reads the query inside the re-ranking prompt, so it routes inside that pass (no
    second pass); its pool stops at layer 19, so every routed pass runs at most 20 of the 30 layers; it was fitted
    on reversed lists of scifact train and five other collections' test queries (bench/loco.py --doc-order reverse
    --set max_layer=20), never on scifact test. The earlier defaults ship as ``router="input"`` (in-prompt, fitted
    on shuffled scifact train, served in BM25 order) and ``router="heads"`` (query alone, heads only), both fitted
    on scifact train alone."""
    from routehead.assets import router_path
    from routehead.selection.route import Route
    from routehead.selection.router import load_router

    path, shipped = router_path("smollm2-135m", None)
    cfg = load_router(path).config
    route = Route.load(cfg.identity)
    assert shipped and cfg.identity["model"] == "smollm2-135m" and cfg.pooling == "prompt-mean"
    assert cfg.trained_on[0] == "scifact/train" and "scifact/test" not in cfg.trained_on
    assert cfg.training["doc_order"] == "reverse" and cfg.serving_order == "reverse"
    assert max(layer for layer, _ in cfg.pool_heads) + 1 <= 0.7 * cfg.num_layers
    routing = route.pass_routing()
    assert routing is not None and routing.layer == cfg.embed_layer and set(routing.pool) == set(cfg.pool_heads)
    for variant, pooling in (("input", "prompt-mean"), ("heads", "mean")):
        old = load_router(router_path("smollm2-135m", variant)[0]).config
        assert old.pooling == pooling and old.trained_on == ["scifact/train"]


def test_gemma_default_router_was_fitted_reversed_from_a_set_and_never_saw_scifact_test():
    """Gemma's default router reads the query alone (layer 15) and may route the first stage; it was fitted on
    reversed lists of scifact train and five other collections' test queries, starting from the greedy set best on
    the training queries (bench/start_choice.py chose it on scifact train); its earlier default (shuffled scifact
    train, heads only) ships as ``router="heads"``."""
    from routehead.assets import router_path
    from routehead.selection.router import load_router

    cfg = load_router(router_path("gemma3-270m", None)[0]).config
    assert cfg.identity["model"] == "gemma3-270m" and cfg.pooling == "mean" and cfg.use_first_stage
    assert cfg.trained_on[0] == "scifact/train" and "scifact/test" not in cfg.trained_on and len(cfg.trained_on) == 6
    assert cfg.training["doc_order"] == "reverse" and cfg.serving_order == "reverse"
    assert cfg.training["start"] == "set" and len(cfg.training["start_signals"]) > 1
    old = load_router(router_path("gemma3-270m", "heads")[0]).config
    assert old.trained_on == ["scifact/train"] and not old.use_first_stage


def test_a_router_is_served_in_its_own_order_unless_told(tmp_path):
    """A router file may record the prompt order it is served in (chosen on held-out train queries by
    bench/serving_order.py); a Reranker without ``doc_order`` serves it there, an explicit order wins, and a
    router that records none is served in the default order."""
    from routehead.assets import router_path
    from routehead.selection.router import load_router
    from routehead.settings import DEFAULT_ORDER

    assert load_router(router_path("smollm2-135m", None)[0]).config.serving_order == "reverse"
    assert load_router(router_path("smollm2-135m", "input")[0]).config.serving_order == "input"
    assert load_router(router_path("smollm2-135m", "heads")[0]).config.serving_order == "reverse"
    gemma = {None: "reverse", "heads": "reverse", "fs": "reverse", "bce": "shuffle"}  # bench/serving_order.py
    for variant, order in gemma.items():
        assert load_router(router_path("gemma3-270m", variant)[0]).config.serving_order == order, variant
    lm = tiny_lm("llama")
    cfg = RouterConfig(identity=lm.identity(), embed_layer=1, pool=[[0, 1], [2, 3]], dim=8, threshold=0.3)
    plain = Router(cfg)
    plain.save(tmp_path / "plain.safetensors")
    assert Reranker(lm, router=tmp_path / "plain.safetensors").doc_order == DEFAULT_ORDER
    plain.config.serving_order = "input"
    plain.save(tmp_path / "input.safetensors")
    assert Reranker(lm, router=tmp_path / "input.safetensors").doc_order == "input"
    assert Reranker(lm, router=tmp_path / "input.safetensors", doc_order="shuffle").doc_order == "shuffle"
    assert Reranker(lm, method="icr").doc_order == DEFAULT_ORDER


def test_router_fingerprint_follows_weights_and_rule_not_metadata(tmp_path):
    """The fingerprint a route calibration is keyed by: the same after a save and load, and after changing only
    the serving order (which does not change a score); different when a weight or the threshold changes."""
    from routehead.selection.router import load_router

    lm = tiny_lm("llama")
    r = Router(RouterConfig(identity=lm.identity(), embed_layer=1, pool=[[0, 1], [2, 3]], dim=8, threshold=0.3))
    r.save(tmp_path / "r.safetensors")
    again = load_router(tmp_path / "r.safetensors")
    assert again.fingerprint() == r.fingerprint()
    again.config.serving_order = "input"
    assert again.fingerprint() == r.fingerprint()
    again.config.threshold = 0.4
    assert again.fingerprint() != r.fingerprint()
    with torch.no_grad():
        r.bias[0] += 1.0
    assert r.fingerprint() != load_router(tmp_path / "r.safetensors").fingerprint()
