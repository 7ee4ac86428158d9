"""The app in-process: malformed reranker output, ``Limits``, ``serve()``, and property-based tests of the input
handling (TestClient, for speed).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Sequence
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from routehead.service import Limits, create_app, serve
from routehead.service import run as run_mod
from routehead.service.errors import GENERIC_500
from tests.service.conftest import FAKE_MODEL, TEST_LIMITS, BatchFake, FakeRanking, expected_results

# --------------------------------------------------------------------------------------------------
# Unit-level: malformed reranker output, Limits, serve()
# --------------------------------------------------------------------------------------------------


class BadOutputReranker(BatchFake):
    """The fake, answering ``ranking`` to every request (and naming only its model)."""

    def __init__(self, ranking: FakeRanking) -> None:
        super().__init__()
        self.ranking = ranking

    def info(self) -> dict[str, Any]:
        return {"model": "bad"}

    def rerank(self, query: str, documents: Sequence[str], first_stage_scores: Sequence[float] | None = None,
               routed_heads: bool = False, evidence: int = 0) -> FakeRanking:
        return self.ranking

    def rerank_many(self, items: Sequence[tuple], batch_size: int = 8, evidence: int = 0) -> list[FakeRanking]:
        return [self.ranking for _ in items]


@pytest.mark.parametrize(
    "ranking",
    [
        FakeRanking([0, 0], [1.0, 1.0], None),  # duplicate index
        FakeRanking([0, 7], [1.0, 0.5], None),  # out of range
        FakeRanking([0, 1], [1.0], None),  # misaligned
        FakeRanking([0, 1], [float("nan"), 0.0], None),  # not JSON
        FakeRanking([0.0, 1.0], [1.0, 0.0], None),  # type: ignore[list-item]  # float indices
    ],
)
def test_malformed_ranking_is_500(ranking: FakeRanking) -> None:
    with TestClient(create_app(BadOutputReranker(ranking)), raise_server_exceptions=False) as tc:
        resp = tc.post("/rerank", json={"query": "q", "documents": ["a", "b"]})
    assert resp.status_code == 500
    assert resp.json() == {"error": {"message": GENERIC_500, "type": "internal_error"}, "detail": GENERIC_500}


def test_return_heads_when_reranker_has_none() -> None:
    """A reranker that routes nothing (e.g. ICR over all heads) answers ``"heads": null``, not a missing key."""
    app = create_app(BadOutputReranker(FakeRanking([1, 0], [2.0, 1.0], None)))
    with TestClient(app) as tc:
        body = tc.post("/rerank", json={"query": "q", "documents": ["a", "b"], "return_heads": True}).json()
    assert body["heads"] is None
    assert [r["index"] for r in body["results"]] == [1, 0]
    assert body["model"] == "bad"


def test_limits_defaults_and_validation() -> None:
    assert Limits() == Limits(
        max_documents=1000, max_document_chars=20000, max_query_chars=4000, max_request_bytes=5_000_000,
        max_request_tokens=65536,
    )
    with pytest.raises(ValueError, match="max_documents"):
        Limits(max_documents=0)
    with pytest.raises(ValueError, match="max_request_bytes"):
        Limits(max_request_bytes=True)


def test_serve_defaults_to_loopback_and_takes_a_factory(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, Any] = {}
    monkeypatch.setattr(run_mod, "_run_server", lambda server: seen.update(server=server))
    made: list[BatchFake] = []

    def factory() -> BatchFake:
        made.append(BatchFake())
        return made[-1]

    serve(factory)
    cfg = seen["server"].config
    assert cfg.host == "127.0.0.1" and cfg.port == 8000
    assert isinstance(cfg.app, FastAPI)
    assert made == []  # the factory runs at start-up, after the socket opens (503 until loaded)
    assert cfg.app.state.service.factory is factory

    instance = BatchFake()
    serve(instance, port=9123, limits=TEST_LIMITS)
    cfg = seen["server"].config
    assert cfg.app.state.reranker is instance and cfg.port == 9123
    assert cfg.app.state.limits == TEST_LIMITS


def test_serve_warns_on_public_bind(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(run_mod, "_run_server", lambda server: None)
    with caplog.at_level(logging.WARNING, logger="routehead.server"):
        serve(BatchFake(), host="0.0.0.0")
    assert "no authentication" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="routehead.server"):
        serve(BatchFake(), host="::1")
    assert caplog.text == ""



# --------------------------------------------------------------------------------------------------
# Property-based: in-process (TestClient) for speed
# --------------------------------------------------------------------------------------------------

PROP_LIMITS = Limits(max_documents=8, max_document_chars=40, max_query_chars=40, max_request_bytes=4000)


@pytest.fixture(scope="module")
def tc() -> Iterator[TestClient]:
    with TestClient(create_app(BatchFake(), PROP_LIMITS), raise_server_exceptions=False) as c:
        yield c


# Any character, surrogates included (JSON can carry them as \ud800 escapes).
any_text = st.text(st.characters(codec=None, exclude_categories=()), max_size=50)
words = st.text(st.sampled_from("abc "), max_size=12)
json_scalars = (
    st.none() | st.booleans() | st.integers(-(10**20), 10**20) | st.floats(allow_nan=False) | any_text
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(any_text, inner, max_size=3),
    max_leaves=8,
)
document_like = (
    words
    | any_text
    | st.fixed_dictionaries({"text": words | any_text})
    | st.fixed_dictionaries({"text": json_values})
    | st.dictionaries(any_text, json_values, max_size=2)
    | json_values
)
field_keys = st.sampled_from(["query", "documents", "top_n", "return_documents", "return_heads", "model"])
payloads = st.one_of(
    st.fixed_dictionaries(
        {
            "query": words | any_text | json_values,
            "documents": st.lists(document_like, max_size=10) | json_values,
        },
        optional={
            "top_n": st.integers(-3, 12) | json_values,
            "return_documents": st.booleans() | json_values,
            "return_heads": st.booleans() | json_values,
            "model": st.just(FAKE_MODEL) | any_text,
            "extra": json_values,
        },
    ),
    st.dictionaries(field_keys | any_text, json_values, max_size=4),
    json_values,
)

PROP_SETTINGS = settings(
    max_examples=50,
    deadline=None,
    database=None,  # no .hypothesis/ directory in the repo
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def check_ok_response(payload: dict[str, Any], body: dict[str, Any]) -> None:
    """A 200 must be a best-first prefix of a permutation of the input indices, equal to the library call."""
    n = len(payload["documents"])
    results = body["results"]
    indices = [r["index"] for r in results]
    scores = [r["relevance_score"] for r in results]
    top_n = payload.get("top_n")
    assert len(indices) == (n if top_n is None else min(top_n, n))
    assert len(set(indices)) == len(indices) and all(0 <= i < n for i in indices)
    assert scores == sorted(scores, reverse=True)
    assert results == expected_results(payload)
    assert body["meta"]["n_documents"] == n


@PROP_SETTINGS
@given(payload=payloads)
def test_property_malformed_input_never_500(tc: TestClient, payload: Any) -> None:
    resp = tc.post("/rerank", content=json.dumps(payload), headers={"content-type": "application/json"})
    assert resp.status_code == 200 or 400 <= resp.status_code < 500, resp.text
    body = resp.json()
    if resp.status_code == 200:
        check_ok_response(payload, body)
    else:
        assert isinstance(body["error"]["message"], str) and body["error"]["message"]
        assert isinstance(body["error"]["type"], str)


@PROP_SETTINGS
@given(raw=st.binary(max_size=300) | any_text.map(lambda s: s.encode("utf-8", "surrogatepass")))
def test_property_raw_bytes_never_500(tc: TestClient, raw: bytes) -> None:
    resp = tc.post("/rerank", content=raw, headers={"content-type": "application/json"})
    assert 400 <= resp.status_code < 500, resp.text
    assert set(resp.json()["error"]) == {"message", "type"}


@PROP_SETTINGS
@given(
    query=words.filter(lambda q: q.strip()),
    documents=st.lists(words | st.fixed_dictionaries({"text": words}), min_size=1, max_size=8),
    top_n=st.none() | st.integers(1, 10),
    return_documents=st.booleans(),
)
def test_property_valid_input_ranks_like_library(
    tc: TestClient, query: str, documents: list[Any], top_n: int | None, return_documents: bool
) -> None:
    payload: dict[str, Any] = {"query": query, "documents": documents, "return_documents": return_documents}
    if top_n is not None:
        payload["top_n"] = top_n
    resp = tc.post("/rerank", json=payload)
    assert resp.status_code == 200, resp.text
    check_ok_response(payload, resp.json())
