"""``routehead train`` on several collections at once (``--data A:SPLIT B:SPLIT``), on a tiny model folder."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from routehead.cli import build_parser, main
from routehead.cli.options import data_spec, job_from, jobs_from

ROOT = Path(__file__).resolve().parents[2]


pytestmark = pytest.mark.usefixtures("one_thread")


def test_data_specs():
    assert data_spec("../data/scifact", "train") == ("../data/scifact", "train")
    assert data_spec("../data/scifact:test", "train") == ("../data/scifact", "test")
    assert data_spec("c:/data/x", "train") == ("c:/data/x", "train")  # a colon followed by a path is the path's
    ap = build_parser()
    one = ap.parse_args(["train", "--data", "../data/scifact", "--out", "r.safetensors"])
    assert one.data == ["../data/scifact"]
    # one collection: the very job the command ran before it took several
    assert jobs_from(one) == [job_from(ap.parse_args(["detect", "--data", "../data/scifact", "--out", "x"]))]
    two = jobs_from(ap.parse_args(["train", "--data", "a:test", "b", "--split", "dev", "--top-k", "5", "--out", "r"]))
    assert [(j.data, j.split, j.scoring.top_k) for j in two] == [("a", "test", 5), ("b", "dev", 5)]


def test_train_on_two_collections(tmp_path, monkeypatch, capsys):
    from routehead.selection.router import load_router
    from routehead.testing import byte_tokenizer
    from routehead.testing.tiny import tiny_model

    folder = tmp_path / "tiny-llama"
    tiny_model("llama").save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    shutil.copytree(ROOT / "examples" / "scifact-mini", tmp_path / "mini-b")
    monkeypatch.setenv("ROUTEHEAD_STORE", str(tmp_path / "store"))
    out = tmp_path / "router.safetensors"
    assert main(["train", "--data", f"{ROOT / 'examples' / 'scifact-mini'}:test", str(tmp_path / "mini-b"),
                 "--split", "test", "--model", str(folder), "--max-queries", "4", "--top-k", "5",
                 "--max-doc-tokens", "24", "--no-progress", "--out", str(out), "--embed-layer", "1", "--pool-size", "8",
                 "--folds", "2", "--epochs", "20"]) == 0
    printed = capsys.readouterr().out
    cfg = load_router(out).config
    assert cfg.trained_on == ["scifact-mini/test", "mini-b/test"] and cfg.training["train_queries"] == 8
    assert "8 training queries of scifact-mini/test, mini-b/test" in printed
    # each collection has its own store and embedding cache; the merged view has no folder
    assert sorted(p.name for p in (tmp_path / "store").iterdir()) == ["mini-b", "scifact-mini"]
