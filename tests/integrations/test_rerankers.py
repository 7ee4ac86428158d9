"""rerankers adapter: RankedResults out, usable as a BaseRanker and through rerankers.Reranker(model_type=...)."""

from __future__ import annotations

import pytest

pytest.importorskip("rerankers")

from rerankers import Reranker as RerankersFactory  # noqa: E402
from rerankers.documents import Document  # noqa: E402
from rerankers.models.ranker import BaseRanker  # noqa: E402
from rerankers.results import RankedResults  # noqa: E402

from routehead.integrations.rerankers import RouteheadRanker  # noqa: E402
from tests.integrations.adapters_common import DOCS, FIRST_STAGE, QUERY, expected  # noqa: E402


def test_rank_gives_ranked_results_like_the_reranker(rr):
    ranker = RouteheadRanker(model=rr)
    assert isinstance(ranker, BaseRanker)
    res = ranker.rank(QUERY, DOCS, doc_ids=[f"d{i}" for i in range(len(DOCS))], first_stage_scores=FIRST_STAGE)
    want = expected(rr, fs=FIRST_STAGE)
    assert isinstance(res, RankedResults) and res.has_scores and res.query == QUERY
    assert [r.document.doc_id for r in res.results] == [f"d{i}" for i in want.indices]
    assert [r.score for r in res.results] == want.scores and [r.rank for r in res] == list(range(1, len(DOCS) + 1))
    top = res.top_k(2)
    assert [r.doc_id for r in top] == [f"d{i}" for i in want.indices[:2]] and top[0].text == DOCS[want.indices[0]]
    assert res[0].document.metadata["routed_heads"] == [list(h) for h in want.heads]
    assert res.get_score_by_docid(f"d{want.indices[0]}") == want.scores[0]


def test_documents_with_metadata_scores_and_without(rr):
    ranker = RouteheadRanker(model=rr)
    docs = [Document(t, doc_id=i, metadata={"score": s}) for i, (t, s) in enumerate(zip(DOCS, FIRST_STAGE))]
    res = ranker.rank(QUERY, docs)
    assert [r.score for r in res] == expected(rr, fs=FIRST_STAGE).scores  # metadata["score"] is the first stage
    plain = ranker.rank(QUERY, DOCS)
    assert [r.score for r in plain] == expected(rr).scores and [r.doc_id for r in plain] == expected(rr).indices
    assert ranker.rank(QUERY, []).results == []
    assert isinstance(ranker.score(QUERY, DOCS[0]), float)


def test_through_the_rerankers_factory(tmp_path):
    from tests.integrations.adapters_common import tiny_folder

    folder = tiny_folder(tmp_path / "tiny-llama")
    ranker = RerankersFactory(str(folder), model_type="routehead", method="icr", verbose=0)
    assert isinstance(ranker, RouteheadRanker) and ranker.reranker.method == "icr"
    res = ranker.rank(QUERY, DOCS)
    assert len(res.results) == len(DOCS)

