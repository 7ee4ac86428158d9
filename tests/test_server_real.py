"""The service around a real Reranker (tiny random Llama, ICR): same answer as the library call."""

from __future__ import annotations

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
        bad = client.post("/rerank", json={"query": " ", "documents": ["x"]})
        assert bad.status_code == 422 and "query" in bad.json()["error"]["message"]
        assert client.get("/health").json()["method"] == "static"
