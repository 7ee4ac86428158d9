"""The layout's promises that a user can feel: baselines that read no pass load no model, and the CLI starts
without torch (the import contracts themselves are checked by ``make lint``)."""

from __future__ import annotations

import json

from tests.cli.test_cli import run_cli


def test_evaluate_bm25_loads_no_model(tmp_path) -> None:
    """``evaluate --reranker bm25`` reads the first stage only: a model that does not exist is never loaded, and
    no store is made."""
    env = {"ROUTEHEAD_STORE": str(tmp_path / "store")}
    out = run_cli("evaluate", "--data", "examples/scifact-mini", "--reranker", "bm25", "--json",
                  "--model", str(tmp_path / "no-such-model"), env=env)
    assert out.returncode == 0, out.stderr
    rep = json.loads(out.stdout)
    assert rep["reranker"] == "bm25" and 0.0 < rep["metrics"]["ndcg@10"] <= 1.0
    assert not (tmp_path / "store").exists()
    out = run_cli("evaluate", "--data", "examples/scifact-mini", "--reranker", "bm25", "icr",
                  "--model", str(tmp_path / "no-such-model"), env=env)
    assert out.returncode == 2 and "Traceback" not in out.stderr  # icr reads passes: the model is needed
