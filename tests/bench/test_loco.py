"""bench/loco.py end to end on tiny stores: three collections of a tiny llama's passes (a base with a train split,
two held out in turn), the JSON it writes, the guard against test figures on seen collections, and a stores-only
rerun that skips what has no store and reproduces every figure."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest

from routehead.errors import RouteheadError

ROOT = Path(__file__).resolve().parents[2]


pytestmark = pytest.mark.usefixtures("one_thread")


def bench():
    spec = importlib.util.spec_from_file_location("bench_loco", ROOT / "bench" / "loco.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_loco_on_tiny_stores(tmp_path, monkeypatch):
    from routehead.engine.model import load_model
    from routehead.selection.heads import save_heads
    from routehead.selection.layers import save_window
    from routehead.selection.router import load_router
    from routehead.testing import byte_tokenizer
    from routehead.testing.tiny import tiny_model

    loco = bench()
    folder = tmp_path / "tiny-llama"
    tiny_model("llama").save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    mini = ROOT / "examples" / "scifact-mini"
    for name in ("mini-base", "mini-b", "mini-c"):
        shutil.copytree(mini, tmp_path / name)
    shutil.copy(mini / "qrels" / "test.tsv", tmp_path / "mini-base" / "qrels" / "train.tsv")
    # mini-b judges every other document relevant to every query, so its queries have several relevant candidates
    # (the split-judgment table needs two)
    docs = [json.loads(line)["_id"] for line in (mini / "corpus.jsonl").read_text().splitlines()][::2]
    qids = [json.loads(line)["_id"] for line in (mini / "queries.jsonl").read_text().splitlines()]
    (tmp_path / "mini-b" / "qrels" / "test.tsv").write_text(
        "query-id\tcorpus-id\tscore\n" + "".join(f"{q}\t{d}\t1\n" for q in qids for d in docs))
    ident = load_model(str(folder)).identity()
    save_heads(tmp_path / "static.json", [(0, 1), (2, 3), (3, 0)], ident)
    save_heads(tmp_path / "core.json", [(1, 1), (3, 2)], ident)
    save_window(tmp_path / "layers.json", (1, 2), ident)
    monkeypatch.setenv("ROUTEHEAD_STORE", str(tmp_path / "store"))
    common = ["--model", str(folder), "--base", f"{tmp_path / 'mini-base'}:train", "--top-k", "5",
              "--max-doc-tokens", "24", "--max-queries", "5", "--assets", f"static={tmp_path / 'static.json'}",
              f"core={tmp_path / 'core.json'}", f"layers={tmp_path / 'layers.json'}",
              f"single={tmp_path / 'static.json'}",
              "--all-out", str(tmp_path / "multi.safetensors")]
    held = [f"{mini}:test", str(tmp_path / "mini-b")]
    got = loco.main([*common, "--collections", *held, str(tmp_path / "absent"), "--out", str(tmp_path / "a.json"),
                     "--set", "embed_layer=1", "pool_size=8", "folds=2", "epochs=20", "--eval-orders", "reverse"])
    assert json.loads((tmp_path / "a.json").read_text()) == json.loads(json.dumps(got))
    assert got["model"] == "tiny-llama" and got["base"] == "mini-base/train" and got["doc_order"] == "shuffle"
    assert got["collections"] == {"mini-base/train": 5, "scifact-mini/test": 5, "mini-b/test": 5}
    absent = str(tmp_path / "absent")
    assert list(got["skipped"]) == [absent] and "no collection folder" in got["skipped"][absent]
    r = got["recipe"]
    assert (r["embed_layer"], r["pool_size"], r["folds"], r["objective"]) == (1, 8, 2, "listwise")
    assert got["route-base"]["trained_on"] == ["mini-base/train"]
    assert got["base_fixed"]["queries"] == 5  # the fixed methods' training figures on the base, beside its OOF
    assert set(got["base_fixed"]["ndcg@10"]) == {"static", "core", "layers", "single", "icr", "bm25"}
    methods = {"route-loco", "route-base", "static", "core", "layers", "single", "icr", "linear", "bm25"}
    for name, other in (("scifact-mini/test", "mini-b/test"), ("mini-b/test", "scifact-mini/test")):
        h = got["held_out"][name]
        assert h["queries"] == 5 and h["route-loco"]["trained_on"] == ["mini-base/train", other]
        assert set(h["ndcg@10"]) == methods and all(0.0 <= v <= 1.0 for v in h["ndcg@10"].values())
        for router in ("route-loco", "route-base"):
            assert set(h["vs"][router]) == methods - {router}
            assert all(0.0 <= c["p"] <= 1.0 and 0.0 <= c["p_randomization"] <= 1.0 for c in h["vs"][router].values())
            assert h["routing"][router]["queries"] == 5
        statics = ("static", "core", "layers", "single")
        assert h["ndcg@10"][h["strongest_static"]] == max(h["ndcg@10"][k] for k in statics)
        # route-loco's candidate orders, one per query (a permutation of its 5 candidates)
        ranks = h["ranking"]["route-loco"]
        assert set(ranks) == set(h["per_query"]["route-loco"])
        assert all(sorted(r) == list(range(5)) for r in ranks.values())
    assert got["pooled"]["queries"] == 10 and set(got["pooled"]["ndcg@10"]) == methods
    # the same routers on the reversed passes: every method, each collection and pooled
    rev = got["orders"]["reverse"]
    assert set(rev) == {"scifact-mini/test", "mini-b/test", "pooled"} and rev["pooled"]["queries"] == 10
    assert all(set(rev[k]["ndcg@10"]) == methods for k in rev)
    assert all(len(rev[k]["ranking"]["route-loco"]) == 5 and rev[k]["routing"]["route-loco"]["queries"] == 5
               for k in rev if k != "pooled")
    multi = load_router(tmp_path / "multi.safetensors").config
    assert multi.trained_on == ["mini-base/train", "scifact-mini/test", "mini-b/test"]
    assert got["route-multi"]["trained_on"] == multi.trained_on and "test_figures" in got["route-multi"]

    # stores only, the recipe read back from a fitted router's file: a collection without a store is skipped and
    # named, every figure is the same
    again = loco.main([*common, "--collections", *held, str(tmp_path / "mini-c"), "--out", str(tmp_path / "b.json"),
                       "--no-compute", "--recipe", str(tmp_path / "multi.safetensors")])
    assert "no stored passes for mini-c/test" in again["skipped"][str(tmp_path / "mini-c")]
    assert again["recipe"] == got["recipe"]
    for key in ("collections", "route-base", "held_out", "pooled"):
        assert again[key] == got[key], key
    # --no-linear: the same routers' figures, without the linear baseline
    quick = loco.main([*common, "--collections", *held, "--out", str(tmp_path / "c.json"), "--no-compute",
                       "--recipe", str(tmp_path / "multi.safetensors"), "--no-linear"])
    assert quick["pooled"]["ndcg@10"] == {k: v for k, v in got["pooled"]["ndcg@10"].items() if k != "linear"}

    # the headroom table over that run: every held-out collection in both orders, each route-loco ranking checked
    # against the run's nDCG@10; mini-b's queries are judged twice, scifact-mini's are not
    (tmp_path / "scifact-mini").symlink_to(mini)
    spec = importlib.util.spec_from_file_location("bench_headroom_table", ROOT / "bench" / "headroom_table.py")
    table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(table)
    rows = table.main(["--loco", str(tmp_path / "a.json"), "--orders", "shuffle", "reverse", "--seeds", "2",
                       "--data-root", str(tmp_path), "--model", f"tiny-llama={folder}", "--top-k", "5",
                       "--max-doc-tokens", "24",
                       "--assets", *common[common.index("--assets") + 1:common.index("--all-out")],
                       "--out", str(tmp_path / "t.json")])["rows"]
    assert [(r["order"], r["collection"]) for r in rows] == [
        (o, c) for o in ("shuffle", "reverse") for c in ("scifact-mini/test", "mini-b/test")]
    for r in rows:
        assert r["queries"] == 5 and r["strongest_static"] in ("static", "core", "layers", "single")
        if r["collection"] == "mini-b/test":
            assert r["judged_twice"] > 0 and 0.0 <= r["router"] <= 1.0 and 0.0 <= r["oracle"] <= 1.0
            assert r["router_gain"] == pytest.approx(r["router"] - r["baseline"])
        else:
            assert r["judged_twice"] == 0 and not r["shows_headroom"]
    assert all(0.0 < r["most_common_set_share"] <= 1.0 for r in rows)  # in every order the run scored
    for r in rows:  # route-loco against the linear combination fitted on its training queries, from the run
        by = got["held_out"] if r["order"] == "shuffle" else got["orders"][r["order"]]
        held = by[r["collection"]]
        assert r["vs_linear"] == held["vs"]["route-loco"]["linear"]["delta"]

    # a router is never scored on a collection it was trained on
    with pytest.raises(RouteheadError, match="no test figure"):
        loco.unseen(load_router(tmp_path / "multi.safetensors"), "mini-b/test")


def test_recipe_is_the_shipped_routers():
    """The shipped router's FitSettings, read back from its file: SmolLM2's default since 2026-12-07, the
    first-stage recipe (listwise, layer-8 embedding, a pool of 32, 5 folds of dim 64 merged into one of 320, the
    first-stage score routable) reading the query inside the prompt."""
    from routehead.assets import default_router_path
    from routehead.selection.router import load_router

    loco = bench()
    cfg = load_router(default_router_path("smollm2-135m")).config
    s = loco.recipe(None, "smollm2-135m", cfg.identity, [])
    assert (s.objective, s.embed_layer, s.pool_size, s.folds, s.dim, s.lr, s.label_max_heads, s.use_first_stage,
            s.pooling) == ("listwise", 8, 32, 5, 64, 3e-3, 4, True, "prompt-mean")
    assert loco.recipe(None, "smollm2-135m", cfg.identity, ["folds=2", "objective=bce"]).folds == 2
    with pytest.raises(SystemExit, match="FitSettings field"):
        loco.recipe(None, "smollm2-135m", cfg.identity, ["nope=1"])
