"""The service over HTTP (the original ``/rerank`` body): a real uvicorn server on loopback around the fake
(``conftest.py``), spoken to with httpx: the answers equal the library call, and 200 requests from 8 clients
never enter the model together.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from routehead.calibration import fallback
from tests.service.conftest import (
    DOCS,
    FAKE_HEADS,
    FAKE_MODEL,
    SLOW,
    TEST_LIMITS,
    BatchFake,
    expected_results,
    fake_rank,
    post_json,
)

# --------------------------------------------------------------------------------------------------
# Happy paths
# --------------------------------------------------------------------------------------------------


def test_health_reports_model_info_and_limits(client: httpx.Client) -> None:
    resp = client.get("/health")
    assert resp.status_code == 200
    body = resp.json()
    assert body["status"] == "ok"
    assert body["model"] == FAKE_MODEL and body["method"] == "fake"
    assert body["heads"] == [list(h) for h in FAKE_HEADS]
    assert body["limits"]["max_request_bytes"] == TEST_LIMITS.max_request_bytes


def test_server_binds_loopback(live: str) -> None:
    assert live.startswith("http://127.0.0.1:")


@pytest.mark.parametrize(
    "query",
    ["cat", "the cat dog", "park friends mat", "zebra", "THE CAT"],
)
def test_results_match_library_call(client: httpx.Client, query: str) -> None:
    resp = post_json(client, {"query": query, "documents": DOCS})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    ranking = fake_rank(query, DOCS)
    assert [r["index"] for r in body["results"]] == ranking.indices
    assert [r["relevance_score"] for r in body["results"]] == list(fallback().relevance(ranking.scores))
    assert body["model"] == FAKE_MODEL
    assert "heads" not in body
    assert all("document" not in r for r in body["results"])
    assert body["meta"]["n_documents"] == len(DOCS)
    assert isinstance(body["meta"]["duration_ms"], float) and body["meta"]["duration_ms"] >= 0


@pytest.mark.parametrize("top_n", [1, 2, 5, 6, 1000])
def test_top_n_cuts_best_first(client: httpx.Client, top_n: int) -> None:
    payload = {"query": "the cat", "documents": DOCS, "top_n": top_n}
    resp = post_json(client, payload)
    assert resp.status_code == 200, resp.text
    results = resp.json()["results"]
    assert len(results) == min(top_n, len(DOCS))
    assert results == expected_results(payload)


def test_return_documents_with_objects_and_strings(client: httpx.Client) -> None:
    mixed = [d if i % 2 else {"text": d} for i, d in enumerate(DOCS)]
    as_strings = post_json(client, {"query": "cat dog", "documents": DOCS, "return_documents": True})
    as_mixed = post_json(client, {"query": "cat dog", "documents": mixed, "return_documents": True})
    as_objects = post_json(client, {"query": "cat dog", "documents": [{"text": d} for d in DOCS]})
    assert as_strings.status_code == as_mixed.status_code == as_objects.status_code == 200
    results = as_strings.json()["results"]
    assert results == as_mixed.json()["results"]
    assert [r["document"]["text"] for r in results] == [DOCS[r["index"]] for r in results]
    assert [r["index"] for r in as_objects.json()["results"]] == [r["index"] for r in results]
    assert all("document" not in r for r in as_objects.json()["results"])


def test_return_heads(client: httpx.Client, fake: BatchFake) -> None:
    with_heads = post_json(client, {"query": "cat", "documents": DOCS, "return_heads": True})
    assert with_heads.status_code == 200
    assert with_heads.json()["heads"] == [[0, 1], [2, 3]]
    assert fake.routed_heads[-1] is True  # the flag is passed to the reranker
    without = post_json(client, {"query": "cat", "documents": DOCS, "return_heads": False})
    assert "heads" not in without.json()
    assert with_heads.json()["results"] == without.json()["results"]


def test_model_field(client: httpx.Client) -> None:
    """Any model name is accepted (clients send their provider's names); the response names the served one."""
    for name in (FAKE_MODEL, "other-model"):
        ok = post_json(client, {"query": "cat", "documents": DOCS, "model": name})
        assert ok.status_code == 200 and ok.json()["model"] == FAKE_MODEL


def test_health_stays_responsive_while_model_busy(
    client: httpx.Client, fake: BatchFake, live: str
) -> None:
    fake.entered.clear()
    result: dict[str, httpx.Response] = {}

    def slow() -> None:
        with httpx.Client(base_url=live, timeout=10, trust_env=False) as c:
            result["resp"] = post_json(c, {"query": f"cat {SLOW}", "documents": DOCS})

    t = threading.Thread(target=slow)
    t.start()
    assert fake.entered.wait(5), "slow request never reached the model"
    t0 = time.perf_counter()
    health = client.get("/health")
    elapsed = time.perf_counter() - t0
    t.join(10)
    assert health.status_code == 200
    assert elapsed < 0.5, f"/health took {elapsed:.3f}s while the model was busy"
    assert result["resp"].status_code == 200


# --------------------------------------------------------------------------------------------------
# Load: 200 requests, 8 concurrent clients
# --------------------------------------------------------------------------------------------------


def test_fake_detects_concurrent_entry() -> None:
    """Without serialisation the fake does fail: the load test below would catch a missing lock."""
    fake = BatchFake(delay=0.2)
    errors: list[BaseException] = []

    def call() -> None:
        try:
            fake.rerank("cat", DOCS)
        except AssertionError as exc:
            errors.append(exc)

    threads = [threading.Thread(target=call) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert fake.overlaps == 1 and len(errors) == 1


def test_load_200_requests_8_clients(live: str, fake: BatchFake) -> None:
    payloads = [
        {"query": "cat", "documents": DOCS},
        {"query": "dog park", "documents": DOCS, "top_n": 2},
        {"query": "the mat", "documents": list(reversed(DOCS)), "return_documents": True},
        {"query": "quantum cat", "documents": [{"text": d} for d in DOCS], "return_heads": True},
        {"query": "friends", "documents": DOCS[:3], "top_n": 1, "return_documents": True},
        {"query": "nothing here", "documents": [f"doc {i} here" for i in range(30)], "top_n": 7},
        {"query": "a b c", "documents": ["c", "b c", "a b c", "a"], "return_heads": True},
        {"query": "zebra", "documents": DOCS + ["zebra zebra"]},
    ]
    expected = [expected_results(p) for p in payloads]
    local = threading.local()
    clients: list[httpx.Client] = []
    clients_lock = threading.Lock()

    def get_client() -> httpx.Client:
        if not hasattr(local, "client"):
            local.client = httpx.Client(base_url=live, timeout=10, trust_env=False)
            with clients_lock:
                clients.append(local.client)
        return local.client

    def one(k: int) -> tuple[int, int, Any]:
        which = k % len(payloads)
        resp = post_json(get_client(), payloads[which])
        return which, resp.status_code, resp.json()

    fake.delay = 0.002  # widen each call so overlapping entries would be caught
    calls_before, overlaps_before = len(fake.calls), fake.overlaps
    t0 = time.perf_counter()
    try:
        with ThreadPoolExecutor(max_workers=8) as pool:
            outcomes = list(pool.map(one, range(200)))
    finally:
        fake.delay = 0.0
        for c in clients:
            c.close()
    elapsed = time.perf_counter() - t0

    assert elapsed < 60, f"200 requests took {elapsed:.1f}s"
    errors = [(w, s, b) for w, s, b in outcomes if s != 200]
    assert errors == []
    for which, _, body in outcomes:
        assert body["results"] == expected[which], f"response mixed up for input {which}"
        assert body["meta"]["n_documents"] == len(payloads[which]["documents"])
        if payloads[which].get("return_heads"):
            assert body["heads"] == [[0, 1], [2, 3]]
        else:
            assert "heads" not in body
    assert fake.calls[calls_before:] == [1] * 200  # one model call per request (the server does not batch)
    assert fake.overlaps == overlaps_before == 0
    print(f"\nload: 200 requests / 8 clients in {elapsed:.2f}s ({200 / elapsed:.0f} req/s)")
