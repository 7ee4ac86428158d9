"""The service around a real Reranker (tiny random Llama): same answer as the library call, and the prompt tokens
it budgets are the reranker's own count."""

from __future__ import annotations

import threading
import time

from fastapi.testclient import TestClient

from routehead.api import Reranker
from routehead.service import create_app
from routehead.testing.tiny import tiny_lm

DOCS = ["Amylase digests starch.", "Paris is in France.", {"text": "Lipase digests fat."}]


def test_service_matches_library_and_reports_heads():
    rr = Reranker(model=tiny_lm("llama"), method="static", heads=[(0, 1), (2, 3)])
    texts = [d if isinstance(d, str) else d["text"] for d in DOCS]
    expected = rr.rerank("which enzyme digests starch?", texts)
    with TestClient(create_app(rr)) as client:
        r = client.post("/rerank", json={"query": "which enzyme digests starch?", "documents": DOCS,
                                         "return_heads": True, "return_documents": True, "top_n": 2,
                                         "raw_scores": True})
        assert r.status_code == 200, r.text
        body = r.json()
        assert [x["index"] for x in body["results"]] == expected.indices[:2]
        assert [x["raw_score"] for x in body["results"]] == expected.scores[:2]
        assert all(0 <= x["relevance_score"] <= 1 for x in body["results"])
        assert body["results"][0]["document"]["text"] == texts[expected.indices[0]]
        assert body["heads"] == [[0, 1], [2, 3]]
        assert body["meta"]["billed_units"]["input_tokens"] == rr.prompt_tokens("which enzyme digests starch?", texts)
        bad = client.post("/rerank", json={"query": " ", "documents": ["x"]})
        assert bad.status_code == 422 and "query" in bad.json()["error"]["message"]
        assert client.get("/health").json()["method"] == "static"


def built_tokens(rr: Reranker, query: str, docs: list[str]) -> int:
    """Tokens of the prompts the scorer builds for ``query`` and ``docs`` (one window, one pass here)."""
    return rr.scorer.builder.prompt(query, docs).length


def test_prompt_tokens_bound_the_built_prompt() -> None:
    rr = Reranker(model=tiny_lm("llama"), method="icr", max_doc_tokens=8)
    query, docs = "which enzyme digests starch?", ["Amylase digests starch.", "Paris " * 40, "Lipase digests fat."]
    counted = rr.prompt_tokens(query, docs)
    assert built_tokens(rr, query, docs) <= counted <= built_tokens(rr, query, docs) + 4 * len(docs)
    assert rr.prompt_tokens(query, docs[:1] + ["Paris " * 400]) == rr.prompt_tokens(query, docs[:2])  # the doc cap
    both = Reranker(model=rr.lm, method="icr", max_doc_tokens=8, doc_order="both")
    assert both.prompt_tokens(query, docs) == 2 * counted  # two passes


def test_counting_beside_a_rerank_leaves_its_prompt_alone() -> None:
    """Encoding flips a setting of the tokenizer object; counting must not do it to the tokenizer rerank uses."""
    rr = Reranker(model=tiny_lm("llama"), method="icr")
    docs = ["Amylase digests starch.", "<|im_end|><|im_start|>" * 4, "Lipase digests fat."]
    want = rr.scorer.builder.prompt("which enzyme?", docs)
    stop = threading.Event()
    counted: set[int] = set()

    def count() -> None:
        while not stop.is_set():
            counted.add(rr.prompt_tokens("which enzyme?", docs))

    threads = [threading.Thread(target=count) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline:
            got = rr.scorer.builder.prompt("which enzyme?", docs)
            assert (got.prefix_ids, got.query_ids) == (want.prefix_ids, want.query_ids)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert len(counted) == 1
