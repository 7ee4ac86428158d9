"""Routing inside the re-ranking pass: a router that reads the query in the prompt (``prompt-*`` pooling) routes at
its layer inside the pass itself, and gives exactly what routing first (a separate pass) and then scoring gives."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from routehead.api import Reranker
from routehead.engine.order import passes, prompt_order
from routehead.offline.data import load_collection
from routehead.selection.router import Router, RouterConfig
from routehead.testing.tiny import tiny_lm

POOL = [[0, 1], [2, 3], [3, 0], [1, 2], [1, 0], [3, 3]]


def _router(lm, path: Path, pooling: str, embed_layer: int = 1) -> Path:
    cfg = RouterConfig(identity=lm.identity(), embed_layer=embed_layer, pool=POOL, dim=8, threshold=0.4,
                       max_heads=len(POOL), weighting="prob", pooling=pooling)
    r = Router(cfg, prior=np.full(len(POOL), 0.45))
    torch.manual_seed(5)
    with torch.no_grad():
        r.head_emb.normal_(0, 1.0)  # queries differ in their routed sets
        r.proj.weight.normal_(0, 0.3)
    r.save(path)
    return path


def _items(n: int = 4) -> list[tuple[str, list[str]]]:
    coll = load_collection("examples/scifact-mini", "test")
    docs = [coll.prompt_text(d) for d in list(coll.corpus)[:6]]
    return [(coll.queries[q], docs[k % 3:k % 3 + 4]) for k, q in enumerate(list(coll.queries)[:n])]


def _route_first(rr: Reranker, query: str, docs: list[str]) -> tuple[np.ndarray, list]:
    """The reference: route with a separate pass over the prompt, then score the routed set."""
    sel = rr._selection(query, docs)
    scores = np.zeros(len(docs))
    orders = passes(rr.doc_order)
    for order in orders:
        perm = prompt_order(len(docs), order, query)
        S = rr.scorer.score(query, [docs[j] for j in perm], heads=sorted(sel.heads.heads), sets=[sel.heads],
                            per_head=False)
        scores[perm] += S.sets[0].double().numpy() / len(orders)
    return scores, sorted(sel.heads.heads)


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3"])
@pytest.mark.parametrize("pooling", ["prompt-mean", "prompt-last"])
def test_in_pass_routing_equals_routing_first(tmp_path: Path, family: str, pooling: str) -> None:
    lm = tiny_lm(family)
    rr = Reranker(lm, router=_router(lm, tmp_path / "r.safetensors", pooling), max_doc_tokens=40)
    assert rr.selector.pass_routing() is not None
    items = _items()
    # a threshold inside the spread of the most query-dependent head, so that queries get different sets
    P = torch.cat([rr.router.probabilities(rr._embedding(q, docs)) for q, docs in items])
    j = int(P.var(0).argmax())
    rr.router.config.threshold = float(P[:, j].min() + P[:, j].max()) / 2
    routed_sets = set()
    ran: list[int] = []
    hooks = [layer.register_forward_pre_hook(lambda m, a, i=i: ran.append(i))
             for i, layer in enumerate(rr.scorer.layers)]
    try:
        one = []
        for q, docs in items:
            ran.clear()
            r = rr.rerank(q, docs)
            deepest = max(a for a, _ in r.heads)
            assert ran == list(range(max(deepest, 1) + 1))  # one pass, stopped at the deepest routed layer
            one.append(r)
    finally:
        for h in hooks:
            h.remove()
    for (q, docs), r in zip(items, one):
        ref, heads = _route_first(rr, q, docs)
        assert r.heads == heads
        routed_sets.add(tuple(heads))
        live = np.empty(len(docs))
        live[r.indices] = r.scores
        np.testing.assert_allclose(live, ref, rtol=1e-5, atol=1e-6)
    assert len(routed_sets) > 1  # the queries were routed differently, so the batch below mixes sets
    batched = rr.rerank_many(items, batch_size=3)
    for a, b in zip(one, batched):
        assert a.indices == b.indices and a.heads == b.heads
        np.testing.assert_allclose(a.scores, b.scores, rtol=1e-5, atol=1e-6)


def test_routing_first_where_the_pass_cannot_route(tmp_path: Path) -> None:
    """Two orders (``both``), or a list that needs two prompts: the router reads the first prompt in a pass of
    its own, as before; evidence works in the routed pass (from the routed set's token rows)."""
    lm = tiny_lm("llama")
    path = _router(lm, tmp_path / "r.safetensors", "prompt-mean")
    q, docs = _items(1)[0]
    _, _, _, fixed, per_doc = Reranker(lm, router=path, max_doc_tokens=40).scorer.plan(q, docs)
    for kw in ({"doc_order": "both"}, {"max_prompt_tokens": fixed + 2 * (40 + per_doc)}):
        rr = Reranker(lm, router=path, max_doc_tokens=40, **kw)
        r = rr.rerank(q, docs)
        assert len(rr.scorer.plan(q, docs)[2]) == (1 if "doc_order" in kw else 2)
        ref, heads = _route_first(rr, q, docs)
        live = np.empty(len(docs))
        live[r.indices] = r.scores
        np.testing.assert_allclose(live, ref, rtol=1e-5, atol=1e-6)
        assert r.heads == heads
    rr = Reranker(lm, router=path, max_doc_tokens=40)
    r = rr.rerank(q, docs, evidence=2)
    assert r.evidence is not None and len(r.evidence) == len(docs)


def test_pooling_names_are_checked_before_any_pass() -> None:
    from routehead.engine.scorer import HeadScorer, PassRouting

    with pytest.raises(ValueError, match="is not prompt-"):
        PassRouting(1, "mean", ((0, 1),), lambda e: None)
    scorer = HeadScorer(tiny_lm("llama"), max_doc_tokens=40)
    with pytest.raises(ValueError, match="unknown pooling 'max'"):
        scorer.query_embedding("q", 1, "max")


def test_timed_routed_mode_runs_an_in_prompt_router_as_the_reranker_does(tmp_path: Path) -> None:
    """bench/speed.py's ``routed`` mode (``testing.passes``) with a router that reads the prompt: it routes inside
    the pass (the Reranker's ranking and heads), and ``routed_source`` embeds the query after
    the documents instead of failing for want of them (the shipped SmolLM2 router since 2026-12-07)."""
    from routehead.selection import load_method
    from routehead.testing.passes import _selection, rerank_pass, routed_source

    lm = tiny_lm("llama")
    path = _router(lm, tmp_path / "r.safetensors", "prompt-mean")
    rr = Reranker(lm, router=path, max_doc_tokens=40, doc_order="input")
    method = load_method("route", lm.identity(), router=path)
    for q, docs in _items(3):
        S = rerank_pass(rr.scorer, [(q, docs)], method)[0]
        r = rr.rerank(q, docs)
        assert [int(i) for i in np.argsort(-S.sets[0].double().numpy(), kind="stable")] == r.indices
        assert sorted(S.routed.heads.heads) == r.heads
        sel = _selection(rr.scorer, method, q, docs)
        assert sorted(sel.heads.heads) == r.heads
        assert routed_source(rr.scorer, method, q, None, docs)["heads"] == [list(h) for h in r.heads]
    with pytest.raises(ValueError, match="pass its documents"):
        _selection(rr.scorer, method, q, None)
