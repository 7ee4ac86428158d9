"""The command line as a user runs it: real default model, the example files shipped in the repo."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from routehead.cli import main, read_documents
from routehead.errors import RouteheadError

ROOT = Path(__file__).resolve().parents[2]


def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "routehead.cli", *args], capture_output=True, text=True,
                          cwd=ROOT, env={**os.environ, **(env or {})}, timeout=600)


def test_read_documents_formats(tmp_path):
    (tmp_path / "d.jsonl").write_text('{"title": "T", "text": "body"}\n{"text": "two"}\n')
    assert read_documents(str(tmp_path / "d.jsonl")) == ["T\nbody", "two"]  # the references' title + "\n" + text
    assert read_documents(str(tmp_path / "d.jsonl"), "v1") == ["T. body", "two"]
    (tmp_path / "d.tsv").write_text("1\tfirst doc\n2\tsecond doc\n")
    assert read_documents(str(tmp_path / "d.tsv")) == ["first doc", "second doc"]
    (tmp_path / "d.txt").write_text("one\n\ntwo\n")
    assert read_documents(str(tmp_path / "d.txt")) == ["one", "two"]
    (tmp_path / "bad.jsonl").write_text('{"title": "no text"}\n')
    with pytest.raises(RouteheadError, match="bad.jsonl:1"):
        read_documents(str(tmp_path / "bad.jsonl"))
    (tmp_path / "empty.txt").write_text("\n")
    with pytest.raises(RouteheadError, match="no documents"):
        read_documents(str(tmp_path / "empty.txt"))


def test_missing_docs_file_is_a_clear_error(capsys):
    assert main(["rerank", "--query", "q", "--docs", "/nonexistent.jsonl"]) == 2
    assert "documents file not found" in capsys.readouterr().err


@pytest.mark.slow
def test_rerank_json_default_is_icr_on_default_model():
    out = run_cli("rerank", "--query", "What lowers the risk of heart disease?", "--docs", "examples/docs.jsonl",
                  "--json")
    assert out.returncode == 0, out.stderr
    body = json.loads(out.stdout)
    assert body["method"] == "icr" and body["model"] == "smollm2-135m"
    docs = read_documents(str(ROOT / "examples/docs.jsonl"))
    assert sorted(r["index"] for r in body["results"]) == list(range(len(docs)))
    assert [r["text"] for r in body["results"]] == [docs[r["index"]] for r in body["results"]]
    scores = [r["score"] for r in body["results"]]
    assert scores == sorted(scores, reverse=True)
    best = body["results"][0]["text"].lower()
    assert "heart" in best or "cardiovascular" in best or "cholesterol" in best


@pytest.mark.slow
def test_evaluate_json_on_example_collection(tmp_path):
    out = run_cli("evaluate", "--data", "examples/scifact-mini", "--split", "test", "--reranker", "icr",
                  "--max-queries", "2", "--top-k", "5", "--json", "--no-progress",
                  env={"ROUTEHEAD_STORE": str(tmp_path)})
    assert out.returncode == 0, out.stderr
    body = json.loads(out.stdout)
    assert body["dataset"] == "scifact-mini" and body["reranker"] == "icr" and body["n_queries"] == 2
    assert 0.0 <= body["metrics"]["ndcg@10"] <= 1.0 and "mrr@10" in body["metrics"]
    assert list(tmp_path.rglob("shard-*.npz")), "the forward passes were not stored"


def test_bad_data_folder_is_a_clear_error(tmp_path):
    out = run_cli("evaluate", "--data", str(tmp_path / "nope"), "--reranker", "bm25")
    assert out.returncode == 2 and "error" in out.stderr and "Traceback" not in out.stderr


@pytest.mark.slow
def test_rerank_route_uses_the_shipped_router():
    out = run_cli("rerank", "--query", "What lowers the risk of heart disease?", "--docs", "examples/docs.jsonl",
                  "--json", "--method", "route")
    assert out.returncode == 0, out.stderr
    body = json.loads(out.stdout)
    assert body["method"] == "route" and body["model"] == "smollm2-135m"
    assert body["heads"] and all(0 <= lay < 30 and 0 <= h < 9 for lay, h in body["heads"])


@pytest.mark.slow
def test_serve_command_answers_rerank_on_loopback():
    """`routehead serve` as the README runs it, then the README's request (with httpx instead of curl)."""
    import socket
    import time

    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "routehead.cli", "serve", "--port", str(port)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120, trust_env=False) as client:
            deadline = time.time() + 180
            while True:
                try:
                    if client.get("/ready").status_code == 200:  # /health is liveness: up before the model
                        break
                except httpx.TransportError:
                    pass
                assert proc.poll() is None and time.time() < deadline, "the service did not start"
                time.sleep(0.5)
            r = client.post("/rerank", json={"query": "heart disease", "documents": ["statins lower cholesterol",
                                             {"text": "jupiter is a gas giant"}], "top_n": 1, "return_heads": True})
            assert r.status_code == 200, r.text
            body = r.json()
            assert len(body["results"]) == 1 and body["model"] == "smollm2-135m"
            assert "heads" in body and body["heads"] is None  # the default, ICR, routes no heads
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.mark.slow
def test_readme_python_example():
    from routehead import Reranker

    rr = Reranker()
    docs = ["Statins lower LDL cholesterol and heart-attack risk.", "Jupiter is a gas giant."]
    out = rr.rank("What lowers the risk of heart disease?", docs, top_k=1)
    assert len(out) == 1 and set(out[0]) == {"corpus_id", "score", "text"}
    r = rr.rerank("What lowers the risk of heart disease?", docs, evidence=3)
    assert sorted(r.indices) == [0, 1] and r.heads is None and r.evidence  # ICR: every head, none routed
    routed = Reranker(method="route").rerank("What lowers the risk of heart disease?", docs)
    assert sorted(routed.indices) == [0, 1] and routed.heads and len(routed.weights) == len(routed.heads)


def test_readme_bigger_model_command_with_a_local_folder(tmp_path):
    """The README's "bigger model on a GPU" command, as far as a CPU box can run it: a model folder in the
    Hugging Face layout (a tiny random Qwen2 saved with save_pretrained, standing in for the hub id), bf16."""
    from routehead.testing import byte_tokenizer
    from routehead.testing.tiny import tiny_model

    folder = tmp_path / "tiny-qwen2"
    tiny_model("qwen2").save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    out = run_cli("evaluate", "--model", str(folder), "--device", "cpu", "--dtype", "bfloat16",
                  "--data", "examples/scifact-mini", "--reranker", "icr", "--max-queries", "2", "--top-k", "3",
                  "--no-progress", "--json", env={"ROUTEHEAD_STORE": str(tmp_path / "store")})
    assert out.returncode == 0, out.stderr
    rep = json.loads(out.stdout)
    assert rep["n_queries"] == 2 and rep["reranker"] == "icr" and 0.0 <= rep["metrics"]["ndcg@10"] <= 1.0


def test_highlight_marks_every_evidence_word_in_an_excerpt():
    from routehead.cli import highlight

    text = "Aspirin lowers the risk of heart attack.\nIt does not cure heart disease."
    assert highlight(text, ["heart", "Aspirin"], tty=False) == (
        "**Aspirin** lowers the risk of **heart** attack. It does not cure **heart** disease.")
    assert "\033[1;33mheart\033[0m" in highlight(text, ["heart"], tty=True)
    long = "filler " * 100 + "needle here" + " filler" * 100
    out = highlight(long, ["needle"], tty=False, width=100)
    assert out.startswith("...") and out.endswith("...") and "**needle**" in out and len(out) < 130
    assert highlight("plain", [], tty=False) == "plain"


def test_batching_auto_is_on_for_gpus_only():
    from routehead.service.config import batching_for

    assert batching_for("auto", ["cuda:0", "cuda:1"]) and not batching_for("auto", ["cpu"])
    assert batching_for("on", ["cpu"]) and not batching_for("off", ["cuda:0"])


def test_a_router_or_heads_imply_their_method():
    from routehead.selection import DEFAULT_METHOD, resolve_method

    assert resolve_method(None) == DEFAULT_METHOD == "icr"
    assert resolve_method(None, router="r.safetensors") == "route"
    assert resolve_method(None, heads=[(0, 0)]) == "static"
    assert resolve_method("icr", router="r.safetensors") == "icr"  # an explicit method wins


@pytest.mark.slow
@pytest.mark.parametrize("method", ["route", "static"])
def test_rerank_with_the_second_backbone_uses_its_shipped_assets(method):
    """Gemma-3-270M's own router and head set (trained for it) are found by name; its heads fit its shape."""
    out = run_cli("rerank", "--model", "gemma3-270m", "--query", "What lowers the risk of heart disease?",
                  "--docs", "examples/docs.jsonl", "--json", "--method", method)
    assert out.returncode == 0, out.stderr
    body = json.loads(out.stdout)
    assert body["method"] == method and body["model"] == "gemma3-270m"
    assert body["heads"] and all(0 <= lay < 18 and 0 <= h < 4 for lay, h in body["heads"])
    assert sorted(r["index"] for r in body["results"]) == list(range(len(body["results"])))


def test_layout_option_reaches_every_scoring_command():
    from routehead.cli import build_parser

    ap = build_parser()
    for argv in (["rerank", "--query", "q", "--docs", "d.txt"], ["serve"], ["score", "--data", "x"],
                 ["evaluate", "--data", "x"], ["detect", "--data", "x", "--out", "h.json"]):
        assert ap.parse_args(argv + ["--layout", "v1"]).layout == "v1"
    assert ap.parse_args(["rerank", "--query", "q", "--docs", "d.txt"]).layout is None  # the assets' layout
    assert ap.parse_args(["score", "--data", "x"]).layout == "reference"
    with pytest.raises(SystemExit):
        ap.parse_args(["serve", "--layout", "v9"])


def test_loader_warnings_are_printed_once(tmp_path):
    """What the loader notices (here a judged document missing from the corpus) reaches the user on stderr, once."""
    import shutil

    data = tmp_path / "coll"
    shutil.copytree(ROOT / "examples/scifact-mini", data)
    with open(data / "qrels" / "test.tsv", "a", encoding="utf-8") as fh:
        first_query = (data / "qrels" / "test.tsv").read_text().splitlines()[1].split("\t")[0]
        fh.write(f"{first_query}\tno-such-doc\t1\n")
    out = run_cli("evaluate", "--data", str(data), "--reranker", "bm25", "--json")
    assert out.returncode == 0, out.stderr
    warnings = [ln for ln in out.stderr.splitlines() if ln.startswith("routehead: warning:")]
    assert len(warnings) == 1 and "not in corpus.jsonl" in warnings[0], out.stderr


def test_max_chunks_per_doc_reaches_every_scoring_command():
    from routehead.cli import build_parser

    ap = build_parser()
    for argv in (["rerank", "--query", "q", "--docs", "d.txt"], ["serve"], ["score", "--data", "x"],
                 ["evaluate", "--data", "x"]):
        assert ap.parse_args(argv).max_chunks_per_doc == 1  # truncation by default
        assert ap.parse_args(argv + ["--max-chunks-per-doc", "3"]).max_chunks_per_doc == 3


def test_chunked_rerank_and_evaluate_on_a_tiny_model(tmp_path):
    """``rerank --max-chunks-per-doc``: one result per document, scores that differ from truncation where a document
    is long; ``evaluate --max-chunks-per-doc``: its passes go to a store of their own, keyed by it."""
    from routehead.testing import byte_tokenizer
    from routehead.testing.tiny import tiny_model

    folder = tmp_path / "tiny-llama"
    tiny_model("llama").save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    docs = tmp_path / "docs.txt"
    docs.write_text("Amylase digests starch.\n" + "Paris is the capital of France. " * 4 + "Amylase is an enzyme.\n"
                    "The sky is blue.\n")
    common = ["rerank", "--model", str(folder), "--query", "enzyme", "--docs", str(docs), "--json",
              "--max-doc-tokens", "24"]
    got = {k: run_cli(*common, "--max-chunks-per-doc", k) for k in ("1", "3")}
    for out in got.values():
        assert out.returncode == 0, out.stderr
    res = {k: {r["index"]: r["score"] for r in json.loads(out.stdout)["results"]} for k, out in got.items()}
    assert sorted(res["1"]) == sorted(res["3"]) == [0, 1, 2] and res["1"] != res["3"]
    out = run_cli("evaluate", "--model", str(folder), "--data", "examples/scifact-mini", "--reranker", "icr",
                  "--max-queries", "1", "--top-k", "3", "--max-doc-tokens", "64", "--max-chunks-per-doc", "2",
                  "--no-progress", "--json", env={"ROUTEHEAD_STORE": str(tmp_path / "store")})
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["n_queries"] == 1
    metas = [json.loads(p.read_text()) for p in (tmp_path / "store").rglob("meta.json")]
    assert [m["settings"]["max_chunks_per_doc"] for m in metas] == [2]
