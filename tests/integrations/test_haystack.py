"""Haystack adapter: a @component ranker, its serialisation and a YAML pipeline, on a tiny random model."""

from __future__ import annotations

import inspect
import math
import os

import pytest

os.environ.setdefault("HAYSTACK_TELEMETRY_ENABLED", "False")
pytest.importorskip("haystack")

from haystack import Document, Pipeline  # noqa: E402

from routehead.integrations.haystack import RouteheadRanker  # noqa: E402
from tests.integrations.adapters_common import DOCS, FIRST_STAGE, QUERY, expected, tiny_folder  # noqa: E402


def _docs(scores=FIRST_STAGE):
    return [Document(id=f"d{i}", content=t, meta={"n": i}, score=s) for i, (t, s) in enumerate(zip(DOCS, scores))]


def _sigmoid(x):
    return 1 / (1 + math.exp(-x))


def test_run_matches_the_reranker_scaled_and_routes_the_retriever_score(rr):
    ranker = RouteheadRanker(model=rr, top_k=3)
    ranker.warm_up()
    docs = _docs()
    out = ranker.run(query=QUERY, documents=docs)["documents"]
    want = expected(rr, fs=FIRST_STAGE)
    assert [d.id for d in out] == [f"d{i}" for i in want.indices[:3]]
    assert [d.score for d in out] == pytest.approx([_sigmoid(s) for s in want.scores[:3]])
    assert out[0].meta["routed_heads"] == [list(h) for h in want.heads] and out[0].meta["first_stage_used"]
    assert out[0].meta["n"] == want.indices[0] and docs[0].score == FIRST_STAGE[0]  # inputs unchanged


def test_unscaled_threshold_and_top_k_at_run_time(rr):
    want = expected(rr)
    ranker = RouteheadRanker(model=rr, scale_score=False)
    out = ranker.run(query=QUERY, documents=_docs([None] * len(DOCS)), top_k=2)["documents"]
    assert [d.score for d in out] == want.scores[:2]
    cut = want.scores[1]
    kept = ranker.run(query=QUERY, documents=_docs([None] * len(DOCS)), score_threshold=cut)["documents"]
    assert [d.score for d in kept] == [s for s in want.scores if s >= cut]
    assert ranker.run(query=QUERY, documents=[])["documents"] == []
    with pytest.raises(ValueError):
        RouteheadRanker(top_k=0)


def test_yaml_pipeline_round_trip(tmp_path):
    folder = tiny_folder(tmp_path / "tiny-llama")
    ranker = RouteheadRanker(model=str(folder), method="static", heads=[[0, 1], [2, 3]], top_k=2,
                             score_threshold=0.0, calibration_factor=0.5, max_doc_tokens=64)
    data = ranker.to_dict()
    assert data["type"] == "routehead.integrations.haystack.RouteheadRanker"
    assert RouteheadRanker.from_dict(data).to_dict() == data
    pipe = Pipeline()
    pipe.add_component("ranker", ranker)
    # Haystack 3 loads only allowlisted modules' classes from YAML; Haystack 2 has no allowlist
    trusted = {"allowed_modules": ["routehead.integrations.haystack"]} \
        if "allowed_modules" in inspect.signature(Pipeline.loads).parameters else {}
    loaded = Pipeline.loads(pipe.dumps(), **trusted)
    assert loaded.get_component("ranker").to_dict() == data
    out = loaded.run({"ranker": {"query": QUERY, "documents": _docs()}})["ranker"]["documents"]
    assert len(out) == 2 and out[0].score >= out[1].score and out[0].meta["routed_heads"] == [[0, 1], [2, 3]]


def test_a_model_object_does_not_serialise(rr):
    with pytest.raises(ValueError, match="cannot be serialised"):
        RouteheadRanker(model=rr).to_dict()

