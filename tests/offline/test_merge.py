"""Several stored collections as one (``merge_scored``): what each store gives survives the merge unchanged, stores
that cannot be trained on together are refused, and a router fits on the merged view with its embeddings cached
per member."""

from __future__ import annotations

import copy
import dataclasses
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from routehead.engine.aggregate import HeadSet
from routehead.errors import RouteheadError
from routehead.offline.collect import merge_scored
from routehead.offline.views import first_stage_scores, gains, queries_for, query_embeddings, selection_scores
from routehead.selection.base import Selection

ROOT = Path(__file__).resolve().parents[2]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def two_stores(tmp_path_factory):
    """scifact-mini test and a copy of it named mini-b (the same query ids: they collide unless namespaced), six
    queries each, scored by the tiny llama in shuffled order (top 5) into a temporary store."""
    from routehead.engine.scorer import HeadScorer
    from routehead.offline.collect import score_collection
    from routehead.offline.data import load_collection
    from routehead.testing.tiny import tiny_lm

    tmp = tmp_path_factory.mktemp("merge")
    shutil.copytree(ROOT / "examples" / "scifact-mini", tmp / "mini-b")
    scorer = HeadScorer(tiny_lm("llama"), max_doc_tokens=24)
    scs = [score_collection(load_collection(path, "test"), scorer, scorer.settings(), top_k=5, max_queries=6,
                            progress=False, doc_order="shuffle", root=tmp / "store")
           for path in (ROOT / "examples" / "scifact-mini", tmp / "mini-b")]
    return scs, scorer


SELECTIONS = [Selection(HeadSet.of(None)), Selection(HeadSet.of([(0, 1), (2, 3), (3, 0)])),
              Selection(HeadSet.of([(1, 2), (3, 3)], [0.7, 0.2]), first_stage_weight=0.5),
              Selection(HeadSet.of([]), 1.0)]  # every head, a set, weighted heads and the first stage, the latter alone


def test_merged_view_scores_each_query_as_its_own_store(two_stores):
    (a, b), _ = two_stores
    m = merge_scored([a, b])
    assert sorted(m.entries) == sorted([f"scifact-mini/test/{q}" for q in a.entries]
                                       + [f"mini-b/test/{q}" for q in b.entries])
    assert m.collection.name == "scifact-mini+mini-b" and m.settings["doc_order"] == "shuffle"
    assert [(x["collection"], x["queries"]) for x in m.settings["members"]] == [("scifact-mini", 6), ("mini-b", 6)]
    for sc in (a, b):
        p = f"{sc.collection.name}/test/"
        for q, e in sc.entries.items():
            assert m.entries[p + q].doc_ids == [p + d for d in e.doc_ids]
            assert m.collection.queries[p + q] == sc.collection.queries[q]
            for d in e.doc_ids:
                assert m.collection.corpus[p + d] is sc.collection.corpus[d]
            for got, want in zip(gains(m, p + q, m.entries[p + q].doc_ids), gains(sc, q, e.doc_ids)):
                np.testing.assert_array_equal(got, want)
            np.testing.assert_array_equal(first_stage_scores(m, p + q), first_stage_scores(sc, q))
            for sel in SELECTIONS:
                np.testing.assert_array_equal(selection_scores(m, p + q, sel), selection_scores(sc, q, sel))
    # the training view too: the same rows, judgments and first stage under the namespaced id
    pool = [(0, 1), (2, 3)]
    want = {f"mini-b/test/{x.qid}": x for x in queries_for(b, pool, True)}
    for x in queries_for(m, pool, True, sorted(want)):
        w = want[x.qid]
        assert np.array_equal(x.rows.numpy(), w.rows.numpy()) and np.array_equal(x.single, w.single)
        assert np.array_equal(x.gains, w.gains) and x.ideal == w.ideal and np.array_equal(x.first_stage, w.first_stage)


def test_merge_refuses_stores_that_cannot_train_together(two_stores):
    (a, b), _ = two_stores

    def changed(sc, **settings):
        out = copy.copy(sc)
        out.settings = {**sc.settings, **settings}
        return out

    for key, value in (("model", "other"), ("dtype", "bfloat16"), ("doc_order", "reverse"), ("top_k", 20),
                       ("max_doc_tokens", 160), ("late_instruction", "x")):
        with pytest.raises(RouteheadError, match=f"different settings: mini-b/test has {key}="):
            merge_scored([a, changed(b, **{key: value})])
    with pytest.raises(RouteheadError, match="chunked documents"):
        merge_scored([a, changed(b, max_chunks_per_doc=2)])
    with pytest.raises(RouteheadError, match="given twice"):
        merge_scored([a, b, a])
    empty = copy.copy(b)
    empty.entries = {}
    with pytest.raises(RouteheadError, match="no stored passes"):
        merge_scored([a, empty])
    with pytest.raises(RouteheadError, match="already a merged view"):
        merge_scored([merge_scored([a]), b])
    with pytest.raises(RouteheadError, match="at least one"):
        merge_scored([])
    # what may differ between collections: their names, splits and first-stage source
    assert len(merge_scored([a, changed(b, first_stage="candidates.tsv")]).entries) == 12


def test_fit_router_on_a_merged_view(two_stores, tmp_path, monkeypatch):
    """fit_router runs on the view unchanged; the router records both collections as seen; the query embeddings
    are each member's own cache (no folder for the view), equal to the member's."""
    from routehead.settings import FitSettings
    from routehead.training.fit import fit_router

    monkeypatch.setenv("ROUTEHEAD_STORE", str(tmp_path))
    (a, b), scorer = two_stores
    m = merge_scored([a, b])
    router, info = fit_router(m, scorer, FitSettings(embed_layer=1, pool_size=8, folds=2, epochs=20))
    assert router.config.trained_on == ["scifact-mini/test", "mini-b/test"]
    assert router.config.training["train_queries"] == 12 and sorted(info["oof_ndcg@10"]) == sorted(m.entries)
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.safetensors")) == [
        "mini-b/test/emb-tiny-llama-L1-mean.safetensors", "scifact-mini/test/emb-tiny-llama-L1-mean.safetensors"]
    merged = query_embeddings(m, scorer, 1)
    own = query_embeddings(b, scorer, 1)
    for q, e in own.items():
        assert np.array_equal(merged[f"mini-b/test/{q}"].numpy(), e.numpy())
    # one store is not a merged view: its router names it alone, as before
    single, _ = fit_router(a, scorer, FitSettings(embed_layer=1, pool_size=8, folds=1, epochs=10))
    assert single.config.trained_on == ["scifact-mini/test"] and "members" not in single.config.training


def test_restarts_merge_the_seeds_routers(two_stores, tmp_path, monkeypatch):
    """restarts=2 is the merge (mean logits) of the routers seeds 0 and 1 give alone, on the same split; the
    record keeps each seed's dev figure."""
    from routehead.settings import FitSettings
    from routehead.training.fit import fit_router

    monkeypatch.setenv("ROUTEHEAD_STORE", str(tmp_path))
    (a, _), scorer = two_stores
    base = FitSettings(embed_layer=1, pool_size=8, folds=1, epochs=20, eval_every=5)
    alone = [fit_router(a, scorer, dataclasses.replace(base, seed=s))[0] for s in (0, 1)]
    both, _ = fit_router(a, scorer, dataclasses.replace(base, restarts=2))
    emb = torch.randn(4, alone[0].proj.in_features)
    want = torch.stack([r(emb) for r in alone]).mean(0)
    assert torch.allclose(both(emb), want, atol=1e-5)
    assert both.config.training["restart_dev_ndcg@10"] == [r.config.training["dev_ndcg@10"] for r in alone]


def test_balance_weighs_each_collection_equally(two_stores, tmp_path, monkeypatch):
    """balance=True: a merged view of 6 + 2 queries weighs them 8/12 and 8/4 (each collection half of the
    objective); the weighted listwise loss with equal weights is the plain one; a balanced router fits and says
    so in its record."""
    from routehead.settings import FitSettings
    from routehead.training.fit import balance_collections, fit_router
    from routehead.training.objectives import listwise_loss, padded

    monkeypatch.setenv("ROUTEHEAD_STORE", str(tmp_path))
    (a, b), scorer = two_stores
    keep = sorted(b.entries)[:2]
    small = dataclasses.replace(b, entries={q: b.entries[q] for q in keep},
                                first_stage={q: b.first_stage[q] for q in keep})
    m = merge_scored([a, small])
    pool = [(0, 1), (2, 3), (3, 0)]
    qs = queries_for(m, pool, False, sorted(m.entries))
    balance_collections(m, qs)
    w = {q.qid: q.weight for q in qs}
    assert all(w[f"scifact-mini/test/{q}"] == pytest.approx(8 / 12) for q in a.entries)
    assert all(w[f"mini-b/test/{q}"] == pytest.approx(8 / 4) for q in keep)
    batch = padded(qs)
    P = torch.rand(len(qs), len(pool))
    torch.testing.assert_close(listwise_loss(P, batch, 1.0, False, torch.ones(len(qs))),
                               listwise_loss(P, batch, 1.0, False))
    router, _ = fit_router(m, scorer, FitSettings(embed_layer=1, pool_size=8, folds=1, epochs=10, balance=True))
    assert router.config.training["balance"] is True


def test_query_embeddings_resume_after_an_interruption(two_stores, tmp_path, monkeypatch):
    """Embeddings are saved every EMBEDDING_FLUSH queries, so a run stopped part way keeps what it computed and the
    next run computes only the rest, with the same values."""
    from routehead.offline import views

    monkeypatch.setenv("ROUTEHEAD_STORE", str(tmp_path))
    monkeypatch.setattr(views, "EMBEDDING_FLUSH", 2)
    (a, _), scorer = two_stores
    want = sorted(a.entries)
    full = {q: e.clone() for q, e in query_embeddings(a, scorer, 1).items()}
    for p in tmp_path.rglob("emb-*.safetensors"):
        p.unlink()
    real, calls = scorer.query_embedding, []

    def stops_at_the_fourth(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(scorer, "query_embedding", stops_at_the_fourth)
    with pytest.raises(KeyboardInterrupt):
        query_embeddings(a, scorer, 1)
    counted = []
    monkeypatch.setattr(scorer, "query_embedding", lambda *a_, **k: counted.append(1) or real(*a_, **k))
    again = query_embeddings(a, scorer, 1)
    assert len(counted) == len(want) - 2  # the two flushed before the interruption were kept
    for q in want:
        assert torch.equal(again[q], full[q])


@pytest.mark.parametrize("start", ["single", "set"])
def test_cross_fitted_members_share_one_start(two_stores, tmp_path, monkeypatch, start):
    """Every fold's router starts from the same selection, the one chosen on all training queries (like the pool):
    members that started from different sets would each keep their own, and their merge (mean logits) would keep
    only the heads they share, a routing no fold was validated on."""
    import routehead.training.fit as fit
    from routehead.offline.views import queries_for
    from routehead.settings import FitSettings

    monkeypatch.setenv("ROUTEHEAD_STORE", str(tmp_path))
    (a, b), scorer = two_stores
    m = merge_scored([a, b])
    s = FitSettings(embed_layer=1, pool_size=8, folds=3, epochs=10, objective="listwise", start=start,
                    use_first_stage=True)
    router, info = fit.fit_router(m, scorer, s)
    members = info["members"]  # the fold routers the merge was made of
    starts = {tuple(r.config.training["start_signals"]) for r in members}
    assert len(members) == 3 and len(starts) == 1
    everyone = queries_for(m, router.config.pool_heads, True, sorted(m.entries))
    assert list(starts.pop()) == sorted(fit._start_signals(router.config, everyone, s))
