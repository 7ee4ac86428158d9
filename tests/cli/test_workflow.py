"""The README's workflow end to end on the shipped example: score -> detect -> label -> train -> evaluate -> plot
-> rerank.

Real default model, a handful of queries and five candidates each, so it stays well under a minute.
"""

from __future__ import annotations

import json

import pytest

from tests.cli.test_cli import run_cli

pytestmark = pytest.mark.slow
DATA = ["--data", "examples/scifact-mini", "--top-k", "5", "--max-queries", "8", "--no-progress"]


def test_score_detect_train_evaluate_plot(tmp_path):
    env = {"ROUTEHEAD_STORE": str(tmp_path / "store")}
    out = run_cli("score", *DATA, "--split", "test", env=env)
    assert out.returncode == 0, out.stderr
    assert "8 queries stored" in out.stdout

    heads = tmp_path / "heads.json"
    out = run_cli("detect", *DATA, "--split", "test", "--top", "4", "--out", str(heads), env=env)
    assert out.returncode == 0, out.stderr
    body = json.loads(heads.read_text())
    assert len(body["heads"]) == 4 and body["model"]["model"] == "smollm2-135m"

    labels = tmp_path / "labels.json"
    out = run_cli("label", *DATA, "--split", "test", "--out", str(labels), env=env)
    assert out.returncode == 0, out.stderr
    body = json.loads(labels.read_text())
    assert body["settings"]["top_k"] == 5 and body["settings"]["identity"]["model"] == "smollm2-135m"
    for lab in body["labels"].values():  # every label is a valid, capped head set with its nDCG
        assert 1 <= len(lab["heads"]) <= 4 and all(0 <= a < 30 and 0 <= b < 9 for a, b in lab["heads"])
        assert 0.0 < lab["ndcg@10"] <= 1.0

    from routehead.selection.router import load_router

    router = tmp_path / "router.safetensors"
    out = run_cli("train", *DATA, "--split", "test", "--out", str(router), "--embed-layer", "4", env=env)
    assert out.returncode == 0, out.stderr
    assert router.is_file() and "out-of-fold (5 folds) nDCG@10" in out.stdout and "of the layers" in out.stdout

    priced = tmp_path / "priced.safetensors"  # cost-aware routing: a price on the layers a routed pass runs
    out = run_cli("train", *DATA, "--split", "test", "--out", str(priced), "--embed-layer", "4", "--depth-cost",
                  "0.5", env=env)
    assert out.returncode == 0, out.stderr
    assert load_router(priced).config.training["depth_cost"] == 0.5
    out = run_cli("train", *DATA, "--split", "test", "--out", str(priced), "--depth-cost", "-1", env=env)
    assert out.returncode == 2 and "cannot be negative" in out.stderr and "Traceback" not in out.stderr

    for max_layer, pool in (("6", 16), ("0", 9)):  # a depth budget: nothing below it can be routed
        shallow = tmp_path / f"shallow{max_layer}.safetensors"  # layer 0 has 9 heads: the pool is capped there
        out = run_cli("train", *DATA, "--split", "test", "--out", str(shallow), "--embed-layer", "4",
                      "--max-layer", max_layer, "--pool-size", "16", env=env)
        assert out.returncode == 0, out.stderr
        cfg = load_router(shallow).config
        assert len(cfg.pool_heads) == pool and max(a for a, _ in cfg.pool_heads) <= int(max_layer)
        assert cfg.training["max_layer"] == int(max_layer)
    out = run_cli("train", *DATA, "--split", "test", "--out", str(tmp_path / "x.safetensors"), "--max-layer", "30",
                  env=env)
    assert out.returncode == 2 and "max_layer 30 is not a layer of this model" in out.stderr
    assert "Traceback" not in out.stderr

    evaluate = ("evaluate", *DATA, "--split", "test", "--reranker", "bm25", "icr", "single", "static", "route",
                "oracle", "--heads", str(heads), "--router", str(router), "--json")
    out = run_cli(*evaluate, env=env)  # the router was trained on this very split: no test figure
    assert out.returncode == 2 and "is no test figure" in out.stderr and "Traceback" not in out.stderr
    out = run_cli(*evaluate, "--training-figures", env=env)
    assert out.returncode == 0, out.stderr
    rep = json.loads(out.stdout)
    assert list(rep["training_figures"]) == ["route"] and "scifact-mini/test" in rep["training_figures"]["route"]
    nd = {k: v["metrics"]["ndcg@10"] for k, v in rep["rerankers"].items()}
    assert set(nd) == {"bm25", "icr", "single", "static", "route", "oracle"}
    assert all(0.0 <= v <= 1.0 for v in nd.values())
    # the oracle starts from each query's own best head and only adds heads that help: never below one fixed head
    assert nd["oracle"] >= nd["single"] - 1e-9

    out = run_cli("plot", *DATA, "--split", "test", "--router", str(router), "--out", str(tmp_path / "plots"),
                  env=env)
    assert out.returncode == 0, out.stderr
    pngs = sorted((tmp_path / "plots").glob("*.png"))
    assert len(pngs) == 3 and all(p.read_bytes()[:4] == b"\x89PNG" for p in pngs)

    out = run_cli("rerank", "--query", "heart disease", "--docs", "examples/docs.jsonl", "--router", str(router),
                  "--json")
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout)
    assert res["heads"] and len(res["head_weights"]) == len(res["heads"]), "routed heads are reported"
