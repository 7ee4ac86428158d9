"""bench/field_table.py: the markdown table reads every evaluation file present and marks each row's best
attention method (baselines excluded)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _module():
    spec = importlib.util.spec_from_file_location("field_table", ROOT / "bench" / "field_table.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _report(n, **ndcg):
    return {"n_queries": n, "rerankers": {m: {"metrics": {"ndcg@10": v}} for m, v in ndcg.items()}}


def test_rows_per_collection_and_order_best_attention_method_marked(tmp_path):
    (tmp_path / "field-methods-m-adi-shuffle.json").write_text(json.dumps(_report(35, bm25=0.9, icr=0.3, core=0.4)))
    (tmp_path / "field-methods-m-med-reverse.json").write_text(json.dumps(_report(30, bm25=0.1, icr=0.5)))
    (tmp_path / "field-methods-other-adi-input.json").write_text(json.dumps(_report(1, icr=0.0)))  # another model
    lines = _module().main(["--model", "m", "--results", str(tmp_path)]).splitlines()
    assert lines[0] == "| collection | order | queries | bm25 | icr | core |"
    assert lines[2:] == ["| med | reverse | 30 | 0.100 | 0.500* | - |",
                         "| adi | shuffle | 35 | 0.900 | 0.300 | 0.400* |"]
