"""The method registry: every registered method scores the same from the stored passes as in the live pass."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from routehead.errors import RouteheadError
from routehead.selection import METHODS, load_method, method_spec, resolve_method


def _router(lm, path: Path, use_first_stage: bool, pooling: str = "mean") -> Path:
    """A random router for the tiny model over a small pool (probability-weighted, so weights matter)."""
    import torch

    from routehead.selection.router import Router, RouterConfig

    cfg = RouterConfig(identity=lm.identity(), embed_layer=1, pool=[[0, 1], [2, 3], [3, 0], [1, 2]], dim=8,
                       threshold=0.3, max_heads=3, use_first_stage=use_first_stage, weighting="prob",
                       pooling=pooling)
    torch.manual_seed(3)
    r = Router(cfg, prior=np.array([0.6, 0.4, 0.5, 0.35] + [0.7] * use_first_stage))
    with torch.no_grad():
        r.head_emb.normal_(0, 1.0)  # queries differ in their routed sets
    r.save(path)
    return path


def _f16_bound(tokens, sel) -> np.ndarray:
    """How far a document's stored score can be from the live one: the store keeps each head's token row as
    float16 of (row / its largest magnitude), so a token's error is at most ``scale * 2**-11`` per head (times
    the head's weight); the all-heads sum (ICR) is kept in float32."""
    counts = np.asarray(tokens.counts, dtype=np.float64)
    if sel.heads.heads is None:
        return 1e-6 * counts
    index = {tuple(h): i for i, h in enumerate(tokens.heads.tolist())}
    weights = sel.heads.weights or (1.0,) * len(sel.heads.heads)
    per_token = sum(abs(w) * float(tokens.scale[index[h]]) for h, w in zip(sel.heads.heads, weights)) * 2.0 ** -11
    return per_token * counts + 1e-7


@pytest.mark.parametrize("order", ["reverse", "input"])
def test_every_method_scores_alike_stored_and_live(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, order: str
                                                   ) -> None:
    """For every registered method (and the routers' first-stage variant): the documents' scores aggregated from
    the stored (float16) token scores equal the live Reranker's on the same prompts within the store's precision,
    and rank alike wherever that precision can tell them apart. A router reading the query in the prompt
    (``prompt-mean``) embeds it offline from the store's candidates in their stored positions as live from the
    pass's prompt: the same embedding. (Not "shuffle": the live pass seeds it with the
    query's text, the store with its id.)"""
    import torch

    from routehead.api import Reranker
    from routehead.engine.scorer import HeadScorer
    from routehead.evaluation.runs import method_run
    from routehead.offline.collect import score_collection
    from routehead.offline.data import load_collection
    from routehead.offline.views import first_stage_scores, query_embeddings, selection_scores
    from routehead.testing.tiny import tiny_lm

    monkeypatch.setenv("ROUTEHEAD_STORE", str(tmp_path / "store"))
    lm = tiny_lm("llama")
    coll = load_collection("examples/scifact-mini", "test")
    scorer = HeadScorer(lm, max_doc_tokens=40)
    sc = score_collection(coll, scorer, scorer.settings(), top_k=5, max_queries=3, progress=False, doc_order=order)
    assets = {"heads": [(0, 1), (2, 3), (3, 0)], "window": (1, 2),  # a window: every head of layers 1..2
              "router": _router(lm, tmp_path / "router.safetensors", use_first_stage=False)}
    fs_router = _router(lm, tmp_path / "router-fs.safetensors", use_first_stage=True)
    in_prompt = _router(lm, tmp_path / "router-p.safetensors", use_first_stage=False, pooling="prompt-mean")
    cases = [(name, assets.get(spec.needs)) for name, spec in METHODS.items()] + [("route", fs_router),
                                                                                 ("route", in_prompt)]
    assert {name for name, _ in cases} == set(METHODS)
    for name, asset in cases:
        kw = {arg: asset for arg, needs in (("router", "router"), ("heads", "heads"), ("heads", "window"))
              if METHODS[name].needs == needs}
        method = load_method(name, lm.identity(), **kw)
        rr = Reranker(lm, method=name, max_doc_tokens=40, doc_order=order, **kw)
        emb = query_embeddings(sc, scorer, *method.embedding) if method.embedding else {}
        for qid, e in sc.entries.items():
            if method.embedding:
                live_emb = rr._embedding(coll.queries[qid], [coll.prompt_text(d) for d in e.doc_ids])
                assert torch.allclose(emb[qid][0], live_emb, atol=1e-5), (name, qid)
            sel = method.select(emb.get(qid))
            stored = selection_scores(sc, qid, sel)
            r = rr.rerank(coll.queries[qid], [coll.prompt_text(d) for d in e.doc_ids],
                          first_stage_scores=first_stage_scores(sc, qid).tolist())
            live = np.empty(len(e.doc_ids))
            live[r.indices] = r.scores
            bound = _f16_bound(e.tokens, sel) if not r.first_stage else np.full(len(live), 5e-3)
            assert np.all(np.abs(stored - live) <= bound), (name, qid, stored, live, bound)
            # rankings agree wherever the live scores are further apart than the stored precision allows
            for i in range(len(live)):
                for j in range(len(live)):
                    if live[i] - live[j] > bound[i] + bound[j]:
                        assert stored[i] > stored[j], (name, qid, i, j)
        assert method_run(sc, method, scorer)  # the evaluation run reads the same selections


def test_registry_names_resolve_and_refuse() -> None:
    assert resolve_method(None) == "icr" and resolve_method(None, router="x") == "route"
    assert resolve_method(None, heads=[(0, 0)]) == "static" and resolve_method("single") == "single"
    assert {s.needs for s in METHODS.values()} == {"nothing", "heads", "window", "router"}
    assert load_method("single", {"model": "m"}, heads=[(3, 0), (0, 1)]).heads == [(3, 0)]  # best first, as given
    with pytest.raises(RouteheadError, match="unknown method 'nope'"):
        method_spec("nope")
    with pytest.raises(RouteheadError, match="at least one head"):
        load_method("static", {"model": "m"}, heads=[])


def test_registry_and_cli_load_no_torch() -> None:
    """The registry and the CLI are torch-free, so ``routehead --help`` is quick."""
    import subprocess

    code = ("import sys, routehead.cli, routehead.selection, routehead.settings, routehead.assets; "
            "print('torch' in sys.modules, 'transformers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_evaluation_refuses_a_router_on_a_collection_it_was_trained_on(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """A router's figure on a collection split whose judged queries trained it is a training figure: evaluating
    it there is refused with a message naming its training collections; the same router on a split it never saw,
    and other methods with it given, evaluate as before; ``training_figures`` keeps the run and names it."""
    from routehead.engine.scorer import HeadScorer
    from routehead.evaluation.runs import evaluate
    from routehead.offline.collect import score_collection
    from routehead.offline.data import load_collection
    from routehead.selection.router import load_router
    from routehead.testing.tiny import tiny_lm

    monkeypatch.setenv("ROUTEHEAD_STORE", str(tmp_path / "store"))
    lm = tiny_lm("llama")
    scorer = HeadScorer(lm, max_doc_tokens=40)
    sc = score_collection(load_collection("examples/scifact-mini", "test"), scorer, scorer.settings(), top_k=5,
                          max_queries=2, progress=False)
    path = _router(lm, tmp_path / "r.safetensors", use_first_stage=False)
    unseen_runs, _ = evaluate(sc, ["bm25", "icr", "route"], scorer, router=path)
    assert set(unseen_runs) == {"bm25", "icr", "route"}
    r = load_router(path)
    r.config.training = {"members": ["scifact/train", "scifact-mini/test"]}
    r.save(path)
    with pytest.raises(RouteheadError, match=r"trained on scifact-mini/test's judged .*scifact/train.*no test figure"):
        evaluate(sc, ["bm25", "route"], scorer, router=path)
    assert set(evaluate(sc, ["icr"], scorer, router=path)[0]) == {"icr"}
    runs, extra = evaluate(sc, ["route"], scorer, router=path, training_figures=True)  # kept, and named as such
    assert set(runs) == {"route"} and "scifact-mini/test" in extra["training_figures"]["route"]


def test_a_head_set_or_window_is_served_in_the_order_its_file_records(tmp_path):
    """Head-set and window files may record, per method, the prompt order it is served in (chosen on held-out
    train queries by bench/serving_order.py); one heads file serves ``static`` and ``single`` in different
    orders, a Reranker without ``doc_order`` follows the file, an explicit order wins, a file without the map
    serves the default order, and an order that is not one is refused when the file loads."""
    import json

    from routehead import Reranker
    from routehead.selection.heads import record_serving_order, save_heads
    from routehead.selection.layers import save_window
    from routehead.settings import DEFAULT_ORDER
    from routehead.testing.tiny import tiny_lm

    rest = {"core": "reverse", "layers": "reverse"}
    shipped = {("smollm2-135m", 30, 9): {"static": "reverse", "single": "input", **rest},
               ("gemma3-270m", 18, 4): {"static": "input", "single": "reverse", **rest}}
    for (model, layers, heads), orders in shipped.items():  # as bench/serving_order.py recorded them
        for m, order in orders.items():
            ident = {"model": model, "num_layers": layers, "num_heads": heads}
            assert load_method(m, ident).serving_order == order, (model, m)
    lm = tiny_lm("llama")
    save_heads(tmp_path / "h.json", [(1, 0), (0, 1)], lm.identity())
    save_window(tmp_path / "w.json", (1, 1), lm.identity())
    assert Reranker(lm, method="static", heads=tmp_path / "h.json").doc_order == DEFAULT_ORDER
    record_serving_order(tmp_path / "h.json", "single", "input")
    record_serving_order(tmp_path / "w.json", "layers", "shuffle")
    assert Reranker(lm, method="single", heads=tmp_path / "h.json").doc_order == "input"
    assert Reranker(lm, method="static", heads=tmp_path / "h.json").doc_order == DEFAULT_ORDER
    assert Reranker(lm, method="single", heads=tmp_path / "h.json", doc_order="reverse").doc_order == "reverse"
    assert Reranker(lm, method="layers", heads=tmp_path / "w.json").doc_order == "shuffle"
    assert json.loads((tmp_path / "h.json").read_text())["heads"] == [[1, 0], [0, 1]]  # heads unchanged
    with pytest.raises(RouteheadError, match="serving_order"):
        record_serving_order(tmp_path / "h.json", "static", "backwards")
    body = json.loads((tmp_path / "h.json").read_text())
    (tmp_path / "bad.json").write_text(json.dumps({**body, "serving_order": {"static": "sideways"}}))
    with pytest.raises(RouteheadError, match="sideways"):
        load_method("static", lm.identity(), heads=tmp_path / "bad.json")
