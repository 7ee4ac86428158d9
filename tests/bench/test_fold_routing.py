"""bench/fold_routing.py on a tiny stored split: it reports each cross-fitted fold router and their merge, all from
the one starting selection, and writes what it printed."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.usefixtures("one_thread")


def test_fold_routing_on_a_tiny_store(tmp_path, monkeypatch):
    from routehead.offline.job import ScoreJob
    from routehead.testing import byte_tokenizer
    from routehead.testing.tiny import tiny_model

    spec = importlib.util.spec_from_file_location("bench_fold_routing", ROOT / "bench" / "fold_routing.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    folder = tmp_path / "tiny-llama"
    tiny_model("llama").save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    data = tmp_path / "mini"
    shutil.copytree(ROOT / "examples" / "scifact-mini", data)
    shutil.copy(data / "qrels" / "test.tsv", data / "qrels" / "train.tsv")
    monkeypatch.setenv("ROUTEHEAD_STORE", str(tmp_path / "store"))
    monkeypatch.chdir(tmp_path)
    ScoreJob(data=str(data), split="train", model=str(folder), dtype="float32", progress=False
             ).with_options(doc_order="reverse").run(compute=True)
    got = bench.main(["--model", str(folder), "--data", str(data), "--doc-order", "reverse", "--recipe", "/nonexistent",
                      "--set", "embed_layer=1", "pool_size=8", "folds=2", "epochs=10", "start=set",
                      "use_first_stage=true"])
    assert json.loads((tmp_path / "results" / "fold-routing-tiny-llama-reverse.json").read_text()) == \
        json.loads(json.dumps(got))
    assert len(got["members"]) == 2 and got["queries"] > 0
    starts = {json.dumps(m["start"]) for m in got["members"]} | {json.dumps(got["merged"]["start"])}
    assert len(starts) == 1  # every fold and the merge start from the one selection
    for r in (*got["members"], got["merged"]):
        assert r["queries"] == got["queries"] and 1 <= r["distinct_sets"] <= got["queries"]
        assert len(r["start_probability_std"]) == len(r["start"]) and 0.0 <= r["mean_jaccard_distance"] <= 1.0
