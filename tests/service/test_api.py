"""The app in-process (TestClient): every shape against recorded request/response pairs, the extras,
readiness, backpressure answers, metrics, docs, and the error shape.

Recorded pairs live in tests/service/data/*.json; volatile fields (ids, timings) are blanked before comparing.
Re-record with ``ROUTEHEAD_RECORD=1 pytest tests/service/test_api.py`` after an intended change.
"""

from __future__ import annotations

import json
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from routehead.errors import RouteheadError
from routehead.service import Limits, RerankerLike, ServiceSettings, create_app
from routehead.service.state import WARMUP
from tests.service.conftest import BOOM, FAKE_MODEL, SLOW, BatchFake, FakeRanking

DATA = Path(__file__).parent / "data"
DOCS = ["the cat sat on the mat", "dogs chase cats in the park", "a cat and a dog are friends", "nothing here"]
VOLATILE = {"id", "duration_ms", "queue_ms", "inference_ms", "created"}


def blank(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: ("*" if k in VOLATILE else blank(v)) for k, v in value.items()}
    if isinstance(value, list):
        return [blank(v) for v in value]
    return value


RECORDED = {
    "cohere-v1": ("/v1/rerank", {"model": "rerank-english-v3.0", "query": "cat dog", "top_n": 3,
                                 "return_documents": True, "rank_fields": None, "max_chunks_per_doc": None,
                                 "documents": DOCS[:2] + [{"text": DOCS[2], "id": "d3"}, DOCS[3]]}),
    "cohere-v2": ("/v2/rerank", {"model": "rerank-v3.5", "query": "cat dog", "documents": DOCS, "top_n": 2,
                                 "max_tokens_per_doc": 4096}),
    "jina": ("/v1/rerank", {"model": "jina-reranker-v2-base-multilingual", "query": "cat",
                            "documents": [{"text": d} for d in DOCS], "return_documents": False}),
    "tei": ("/rerank", {"query": "cat dog", "texts": DOCS, "return_text": True, "truncate": True,
                        "truncation_direction": "Right"}),
    "tei-raw": ("/rerank", {"query": "cat dog", "texts": DOCS, "raw_scores": True}),
    "routehead-extras": ("/rerank", {"query": "cat dog", "documents": DOCS, "return_heads": True,
                                     "return_evidence": 2, "raw_scores": True, "top_n": 2}),
    "rank-fields": ("/v1/rerank", {"query": "cat", "rank_fields": ["title", "body"], "return_documents": True,
                                   "documents": [{"title": "dogs", "body": "a dog"}, {"title": "cat", "n": 1}]}),
    "tei-rerankers": ("/rerank", {"model": "BAAI/bge-reranker-base", "query": "cat dog", "texts": DOCS, "top_n": 4,
                                  "return_text": True}),  # rerankers' TEI provider
    "infinity": ("/rerank", {"query": "cat", "documents": DOCS, "return_documents": False, "raw_scores": False,
                             "model": "mixedbread-ai/mxbai-rerank-xsmall-v1", "top_n": 2}),  # infinity_client
}


@pytest.fixture(scope="module")
def tc(fake: BatchFake):
    with TestClient(create_app(fake, Limits(max_documents=20, max_request_tokens=2000))) as client:
        yield client


@pytest.mark.parametrize("name", sorted(RECORDED))
def test_recorded_pairs(tc: TestClient, name: str) -> None:
    path, request = RECORDED[name]
    resp = tc.post(path, json=request)
    assert resp.status_code == 200, resp.text
    for header in ("x-queue-time", "x-inference-time", "x-total-time", "x-request-id"):
        assert float(resp.headers[header]) >= 0 if header != "x-request-id" else resp.headers[header]
    got = {"path": path, "request": request, "response": blank(resp.json())}
    file = DATA / f"{name}.json"
    if os.environ.get("ROUTEHEAD_RECORD") or not file.exists():
        DATA.mkdir(parents=True, exist_ok=True)
        file.write_text(json.dumps(got, indent=1) + "\n")
    assert got == json.loads(file.read_text())


def test_scores_are_calibrated_values_not_per_list(tc: TestClient) -> None:
    one = tc.post("/v1/rerank", json={"query": "cat dog", "documents": [DOCS[2]], "raw_scores": True}).json()
    many = tc.post("/v1/rerank", json={"query": "cat dog", "documents": DOCS, "raw_scores": True}).json()
    assert one["meta"]["calibrated"] is False  # no asset for the fake: the flagged fallback
    # a single document is not 0.0 (z-score) or 1.0 (min-max), and it keeps its value inside a longer list
    assert 0 < one["results"][0]["relevance_score"] < 1
    assert one["results"][0]["relevance_score"] == many["results"][0]["relevance_score"]
    scores = [r["relevance_score"] for r in many["results"]]
    assert scores == sorted(scores, reverse=True)
    assert [r["raw_score"] for r in many["results"]] == [2.0, 1.0, 0.0, 0.0]


def test_any_model_name_and_extra_document_keys(tc: TestClient) -> None:
    for model in ("rerank-v3.5", "jina-reranker-v2-base-multilingual", "whatever"):
        body = tc.post("/v1/rerank", json={"model": model, "query": "cat", "documents": [{"text": "cat", "x": 1}]})
        assert body.status_code == 200 and body.json()["model"] == FAKE_MODEL


def test_max_tokens_per_doc_truncates(tc: TestClient) -> None:
    # the fake has no tokenizer: 4 characters a token, so 2 tokens keep "the " and drop "cat"
    full = tc.post("/v2/rerank", json={"query": "cat", "documents": ["the cat", "cat"]}).json()
    cut = tc.post("/v2/rerank", json={"query": "cat", "documents": ["the cat", "cat"], "max_tokens_per_doc": 1,
                                      "return_documents": True}).json()
    assert [r["index"] for r in full["results"]] == [0, 1]
    assert [r["document"]["text"] for r in cut["results"]] == ["cat", "the "]


def test_tei_shape_ignores_what_tei_ignores_and_honours_top_n(tc: TestClient) -> None:
    resp = tc.post("/rerank", json={"query": "cat dog", "texts": DOCS, "model": "m", "top_n": 2, "bogus\u00e9": 1})
    assert resp.status_code == 200 and len(resp.json()) == 2
    assert resp.headers["x-ignored-fields"] == "model, +1 more"  # names unsafe in a header are only counted
    assert "x-ignored-fields" not in tc.post("/rerank", json={"query": "cat", "texts": DOCS}).headers


def test_rank_fields_without_any_named_field_rank_as_empty_text(tc: TestClient) -> None:
    body = tc.post("/v1/rerank", json={"query": "cat", "rank_fields": ["title"], "return_documents": True,
                                       "documents": [{"body": "cat"}, {"title": "cat"}]}).json()
    assert [(r["index"], r["document"]["text"]) for r in body["results"]] == [(1, "title: cat"), (0, "")]
    assert any("1 document(s) have none of the rank_fields" in w for w in body["meta"]["warnings"])


def test_each_shape_gets_the_error_body_its_clients_parse(tc: TestClient) -> None:
    bad = {"query": " ", "documents": DOCS}
    jina, infinity, cohere = (tc.post(p, json=bad).json() for p in ("/v1/rerank", "/rerank", "/v2/rerank"))
    message = cohere["error"]["message"]
    assert set(cohere) == {"error"}  # Cohere's SDK and OpenAI's read the one shape
    assert jina == {"error": cohere["error"], "detail": message}  # Jina's clients raise RuntimeError(detail)
    assert infinity["detail"] == [{"loc": ["body"], "msg": message, "type": "validation_error"}]  # FastAPI's 422
    assert tc.post("/v1/rerank", content=b"x" * 10, headers={"content-length": "x"}).json()["detail"]
    assert tc.get("/v1/rerank").json()["detail"] == "Method Not Allowed"


def test_ignored_fields_are_reported(tc: TestClient) -> None:
    body = tc.post("/v2/rerank", json={"query": "cat", "documents": DOCS, "priority": 1,
                                       "relevant_spans": {"mode": "enabled"}}).json()
    assert any("relevant_spans" in w for w in body["meta"]["warnings"])


@pytest.mark.parametrize(("path", "payload", "type_", "fragment"), [
    ("/v1/rerank", {"query": "cat", "documents": DOCS, "topn": 3}, "validation_error", "'topn'"),
    ("/v1/rerank", {"query": "cat", "documents": [{"id": 1}]}, "validation_error", '"text"'),
    ("/v1/rerank", {"query": "cat", "documents": [{"text": 5}]}, "validation_error", "documents[0]"),
    ("/v1/rerank", {"query": " ", "documents": DOCS}, "validation_error", "query"),
    ("/v1/rerank", {"query": "cat", "documents": []}, "validation_error", "at least one"),
    ("/v1/rerank", {"query": "cat", "texts": DOCS}, "validation_error", "'texts'"),  # TEI only on /rerank
    ("/rerank", {"query": "cat", "texts": [1]}, "validation_error", "texts[0]"),
    ("/rerank", {"query": "cat", "texts": DOCS, "top_n": 0}, "validation_error", "top_n"),
    ("/rerank", {"query": "cat", "documents": ["x"] * 21}, "limit_exceeded", "max_documents=20"),
    ("/rerank", {"query": "cat", "documents": ["word " * 2000]}, "limit_exceeded", "max_request_tokens=2000"),
    ("/rerank", {"query": "cat", "documents": DOCS, "first_stage_scores": [1.0]}, "validation_error", "1 scores"),
    ("/rerank", {"query": "cat", "documents": DOCS, "return_evidence": 100}, "validation_error", "64"),
])
def test_bad_input(tc: TestClient, path: str, payload: dict, type_: str, fragment: str) -> None:
    resp = tc.post(path, json=payload)
    assert resp.status_code == 422, resp.text
    assert resp.json()["error"]["type"] == type_
    assert fragment in resp.json()["error"]["message"], resp.json()


def test_model_error_is_500_and_the_service_keeps_serving(tc: TestClient) -> None:
    bad = tc.post("/v1/rerank", json={"query": "cat", "documents": [BOOM]})
    assert bad.status_code == 500 and bad.json()["error"]["type"] == "internal_error"
    assert tc.post("/v1/rerank", json={"query": "cat", "documents": DOCS}).status_code == 200


def test_status_endpoints_head_allow_models_docs(tc: TestClient) -> None:
    assert tc.head("/health").status_code == 200 and tc.head("/ready").status_code == 200
    health = tc.get("/health").json()
    assert health["ready"] is True and health["model"] == FAKE_MODEL and health["calibrated"] is False
    wrong = tc.get("/v1/rerank")
    assert wrong.status_code == 405 and wrong.headers["allow"] == "POST"
    assert wrong.json()["error"]["type"] == "method_not_allowed"
    assert tc.get("/nope").json()["error"]["type"] == "not_found"
    listed = tc.get("/v1/models").json()["data"]
    assert [m["id"] for m in listed] == [FAKE_MODEL] and listed[0]["owned_by"] == "routehead"
    assert {"queue_fraction", "queue_absolute", "results_pending", "batch_size"} == set(listed[0]["stats"])
    infinity = tc.get("/models").json()["data"][0]
    assert infinity["id"] == FAKE_MODEL and "owned_by" not in infinity and "stats" in infinity
    assert tc.get(f"/v1/models/{FAKE_MODEL}").json()["id"] == FAKE_MODEL  # a name with a slash
    missing = tc.get("/v1/models/other")
    assert missing.status_code == 404 and missing.json()["error"]["type"] == "not_found"
    page = tc.get("/docs")
    assert page.status_code == 200 and "/v2/rerank" in page.text
    assert "<script" not in page.text and "cdn" not in page.text.lower()  # works offline
    assert tc.get("/redoc").status_code == 404


def test_metrics(tc: TestClient) -> None:
    tc.post("/v1/rerank", json={"query": "cat", "documents": DOCS})
    tc.post("/v1/rerank", json={"query": "cat", "documents": []})
    text = tc.get("/metrics").text
    for name in ('routehead_requests_total{endpoint="/v1/rerank",outcome="ok"}',
                 'routehead_requests_total{endpoint="/v1/rerank",outcome="422"}',
                 'routehead_request_failures_total{reason="invalid_request"}', "routehead_queue_size",
                 "routehead_batch_size_bucket", "routehead_batch_tokens_bucket", "routehead_ready 1.0",
                 "routehead_queue_duration_seconds_bucket", "routehead_inference_duration_seconds_bucket",
                 "routehead_request_duration_seconds_bucket"):
        assert name in text, name


def test_openapi_declares_every_shape(tc: TestClient) -> None:
    spec = tc.get("/openapi.json").json()
    assert {"/v1/rerank", "/v2/rerank", "/rerank", "/v1/models", "/health", "/ready", "/metrics"} <= set(spec["paths"])
    rerank = spec["paths"]["/rerank"]["post"]
    shapes = rerank["requestBody"]["content"]["application/json"]["schema"]["anyOf"]
    assert {"documents", "texts"} <= {k for s in shapes for k in s["properties"]}
    assert {"200", "422", "429", "503", "504"} <= set(rerank["responses"])
    cohere = shapes[0]
    assert cohere["properties"]["documents"]["maxItems"] == 20  # the served limits, in the schema
    assert cohere["properties"]["query"]["maxLength"] == Limits().max_query_chars
    assert shapes[1]["properties"]["texts"]["maxItems"] == 20 and shapes[1]["not"] == {"required": ["documents"]}
    assert "x-same-length-as" in cohere["properties"]["first_stage_scores"]
    def error_model(path: str) -> str:
        return spec["paths"][path]["post"]["responses"]["422"]["content"]["application/json"]["schema"]["$ref"]

    assert [error_model(p).rsplit("/", 1)[1] for p in ("/rerank", "/v1/rerank", "/v2/rerank")] == [
        "DetailedErrorResponse", "DetailedErrorResponse", "ErrorResponse"]
    assert "detail" in spec["components"]["schemas"]["DetailedErrorResponse"]["required"]


def test_not_ready_while_loading_then_ready() -> None:
    gate = threading.Event()

    def factory() -> BatchFake:
        gate.wait(10)
        return BatchFake()

    with TestClient(create_app(factory)) as client:
        assert client.get("/health").status_code == 200
        ready = client.get("/ready")
        assert ready.status_code == 503 and ready.json()["status"] == "loading" and "retry-after" in ready.headers
        busy = client.post("/v1/rerank", json={"query": "cat", "documents": DOCS})
        assert busy.status_code == 503 and busy.json()["error"]["type"] == "not_ready"
        gate.set()
        deadline = time.monotonic() + 10
        while client.get("/ready").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert client.post("/v1/rerank", json={"query": "cat", "documents": DOCS}).status_code == 200


def test_failed_load_and_failed_warmup_stay_not_ready() -> None:
    def broken() -> BatchFake:
        raise OSError("weights not found")

    with TestClient(create_app(broken)) as client:
        deadline = time.monotonic() + 10
        while client.get("/ready").json()["status"] == "loading":
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert client.get("/ready").json()["status"] == "failed"
        assert "weights not found" in client.post("/v1/rerank", json={"query": "q", "documents": ["d"]}).text
    fake = BatchFake()
    fake.rerank = lambda *a, **k: (_ for _ in ()).throw(RuntimeError("cuda broke"))  # type: ignore[method-assign]
    with TestClient(create_app(fake)) as client:
        assert client.get("/ready").json()["status"] == "failed"


def test_queue_full_is_429_and_deadline_is_504() -> None:
    fake = BatchFake()
    app = create_app(fake, settings=ServiceSettings(max_concurrent_requests=1, request_timeout_s=0.3,
                                                    retry_after_s=2))
    with TestClient(app) as client:
        out: dict[str, Any] = {}
        t = threading.Thread(target=lambda: out.update(
            slow=client.post("/v1/rerank", json={"query": f"cat {SLOW}", "documents": DOCS})))
        fake.entered.clear()
        t.start()
        assert fake.entered.wait(5)
        full = client.post("/v1/rerank", json={"query": "cat", "documents": DOCS})
        assert full.status_code == 429 and full.headers["retry-after"] == "2"
        assert full.json()["error"]["type"] == "overloaded"
        t.join(10)
        assert out["slow"].status_code == 504 and out["slow"].json()["error"]["type"] == "timeout"
        time.sleep(1.0)  # the slow call finishes; its slot was already freed by the 504
        assert client.post("/v1/rerank", json={"query": "cat", "documents": DOCS}).status_code == 200


def test_overload_is_shed_at_once_with_retry_after_not_a_504() -> None:
    """Once the queue knows its tokens/s (one 0.3 s call), 12 concurrent requests with a 1 s deadline: the ones the
    queue would keep past it get 429 with Retry-After at once; none waits for a 504."""
    fake = BatchFake(delay=0.3)
    app = create_app(fake, settings=ServiceSettings(batching=False, request_timeout_s=1.0))
    body = {"query": "cat", "documents": DOCS}
    with TestClient(app) as client:
        assert client.post("/v1/rerank", json=body).status_code == 200
        fake.delay = 0.15  # faster than measured: the admitted ones finish well within the deadline
        with ThreadPoolExecutor(max_workers=12) as pool:
            answers = list(pool.map(lambda _: client.post("/v1/rerank", json=body), range(12)))
        metrics = client.get("/metrics").text
    codes = [a.status_code for a in answers]
    assert set(codes) == {200, 429}, codes
    for shed in (a for a in answers if a.status_code == 429):
        assert int(shed.headers["retry-after"]) >= 1
        assert shed.json()["error"]["type"] == "overloaded" and "request_timeout_s=1" in shed.json()["detail"]
    assert 'routehead_request_failures_total{reason="deadline"}' in metrics
    assert "routehead_replica_tokens_per_second" in metrics


def test_evidence_without_support_gives_empty_lists_and_a_warning() -> None:
    class NoEvidence(BatchFake):
        def rerank(self, query, documents, first_stage_scores=None, routed_heads=False, evidence=0) -> FakeRanking:
            return super().rerank(query, documents)

        def rerank_many(self, items, batch_size=8, evidence=0) -> list[FakeRanking]:
            return super().rerank_many(items, batch_size)

    fake = NoEvidence()
    with TestClient(create_app(fake)) as client:
        body = client.post("/v1/rerank", json={"query": "cat", "documents": DOCS, "return_evidence": 3}).json()
    assert all(r["evidence"] == [] for r in body["results"])
    assert any("evidence" in w for w in body["meta"]["warnings"])


def test_warmup_is_a_tiny_request() -> None:
    assert len(WARMUP.documents) == 1 and WARMUP.tokens < 100


def test_a_reranker_is_what_the_protocol_says() -> None:
    class OnlyRerank:  # the duck type of old: no rerank_many, no prompt_tokens
        def info(self) -> dict:
            return {"model": "duck"}

        def rerank(self, query, documents, **kwargs):
            raise AssertionError("never called")

    assert isinstance(BatchFake(), RerankerLike)
    assert not isinstance(OnlyRerank(), RerankerLike)
    with pytest.raises(TypeError, match="RerankerLike"):
        create_app(OnlyRerank())


def test_prompt_tokens_are_the_rerankers_count() -> None:
    class Counted(BatchFake):
        def prompt_tokens(self, query, documents) -> int:
            if "refuse" in query:
                raise RouteheadError("the reranker refuses this query")
            return 1000 * len(documents)

    with TestClient(create_app(Counted(), Limits(max_request_tokens=2500))) as client:
        ok = client.post("/v1/rerank", json={"query": "cat", "documents": DOCS[:2]}).json()
        assert ok["meta"]["billed_units"]["input_tokens"] == ok["usage"]["total_tokens"] == 2000
        over = client.post("/v1/rerank", json={"query": "cat", "documents": DOCS[:3]})
        assert over.status_code == 422 and over.json()["error"]["type"] == "limit_exceeded"
        assert "3000 prompt tokens" in over.json()["error"]["message"]
        refused = client.post("/v1/rerank", json={"query": "refuse", "documents": DOCS[:1]})
        assert refused.status_code == 422 and refused.json()["error"] == {
            "message": "the reranker refuses this query", "type": "invalid_input"}
        text = client.get("/metrics").text
    assert "routehead_batch_tokens_sum 2000.0" in text  # the batch budget is counted in the same tokens
    assert 'routehead_request_failures_total{reason="invalid_input"} 1.0' in text
