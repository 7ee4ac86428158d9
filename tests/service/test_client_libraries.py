"""The re-rank client libraries of issue #36 against a real server on 127.0.0.1 around the fake reranker, one small
request each: rerankers' TEI provider, Infinity's client (and LangChain's InfinityRerank through it), Jina's
LangChain and LlamaIndex clients (answers and errors), and OpenAI's ``models.list``/``models.retrieve``.

Each client is imported inside its test, so a missing package fails only its own test.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator

import httpx
import pytest

from routehead.calibration import fallback
from routehead.service import ServiceSettings, create_app
from tests.service.conftest import FAKE_MODEL, BatchFake, fake_rank, live_server

DOCS = ["the cat sat on the mat", "dogs chase cats in the park", "a cat and a dog are friends", "nothing here"]


@pytest.fixture(scope="module")
def live(fake: BatchFake) -> Iterator[str]:
    with live_server(create_app(fake, settings=ServiceSettings(batching=False))) as base:
        yield base


def best(query: str, n: int) -> tuple[list[int], list[float]]:
    """The fake's ``n`` best indices and calibrated scores for ``query`` over ``DOCS``."""
    r = fake_rank(query, DOCS)
    return r.indices[:n], [float(p) for p in fallback().relevance(r.scores[:n])]


def test_rerankers_tei_provider_sends_model_and_top_n(live: str, caplog: pytest.LogCaptureFixture) -> None:
    from rerankers import Reranker

    ranker = Reranker("served", model_type="text-embeddings-inference", api_key="-", url=f"{live}/rerank",
                      verbose=0)
    with caplog.at_level(logging.INFO, logger="routehead.service"):
        results = ranker.rank("cat dog", DOCS).results
    indices, scores = best("cat dog", len(DOCS))
    assert [DOCS.index(r.document.text) for r in results] == indices
    assert [r.score for r in results] == pytest.approx(scores)
    assert any(getattr(rec, "ignored_fields", None) == "model" for rec in caplog.records)  # reported in the log


def test_tei_ignores_unknown_fields_reports_them_and_honours_top_n(live: str) -> None:
    body = {"query": "cat dog", "texts": DOCS, "model": "bge", "top_n": 2, "return_text": True, "extra": [1]}
    resp = httpx.post(f"{live}/rerank", json=body, timeout=10, trust_env=False)
    assert resp.status_code == 200, resp.text
    assert resp.headers["x-ignored-fields"] == "model, extra"
    assert [x["index"] for x in resp.json()] == best("cat dog", 2)[0]
    typo = httpx.post(f"{live}/rerank", json={"query": "cat", "documents": DOCS, "topn": 2}, trust_env=False)
    assert typo.status_code == 422  # the Cohere shape still refuses unknown fields


def test_infinity_client_models_and_rerank(live: str) -> None:
    from infinity_client import Client
    from infinity_client.api.default import models, rerank
    from infinity_client.models import RerankInput

    client = Client(base_url=live, raise_on_unexpected_status=True, timeout=httpx.Timeout(10))
    listed = models.sync(client=client)
    assert listed is not None and listed.data[0].id == FAKE_MODEL
    assert listed.data[0].stats["queue_fraction"] == 0.0
    got = rerank.sync(client=client, body=RerankInput(query="cat", documents=DOCS, model="any", top_n=2))
    assert [r.index for r in got.results] == best("cat", 2)[0]
    assert got.usage.prompt_tokens == got.usage.total_tokens > 0
    refused = rerank.sync(client=client, body=RerankInput(query=" ", documents=DOCS))
    assert "query" in refused.detail[0].msg  # FastAPI's 422 list, parsed


def test_langchain_infinity_rerank(live: str) -> None:
    from infinity_client import Client
    from langchain_core.documents import Document

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # langchain-community says it is being sunset
        from langchain_community.document_compressors.infinity_rerank import InfinityRerank

    compressor = InfinityRerank(client=Client(base_url=live), model="any", top_n=2)
    out = compressor.compress_documents([Document(page_content=d) for d in DOCS], "cat dog")
    indices, scores = best("cat dog", 2)
    assert [d.page_content for d in out] == [DOCS[i] for i in indices]
    assert [d.metadata["relevance_score"] for d in out] == pytest.approx(scores)


def test_langchain_jina_rerank_answers_and_errors(live: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from langchain_core.documents import Document

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from langchain_community.document_compressors import jina_rerank

    monkeypatch.setattr(jina_rerank, "JINA_API_URL", f"{live}/v1/rerank")  # the client hard-codes Jina's URL
    compressor = jina_rerank.JinaRerank(jina_api_key="-", top_n=2)
    out = compressor.compress_documents([Document(page_content=d) for d in DOCS], "cat")
    assert [d.page_content for d in out] == [DOCS[i] for i in best("cat", 2)[0]]
    with pytest.raises(RuntimeError, match="query: must not be empty"):  # was KeyError: 'detail'
        compressor.rerank(DOCS, " ")


def test_llamaindex_jina_rerank_answers_and_errors(live: str) -> None:
    from llama_index.core.schema import NodeWithScore, QueryBundle, TextNode
    from llama_index.postprocessor.jinaai_rerank import JinaRerank

    post = JinaRerank(api_key="-", base_url=f"{live}/v1", top_n=2)
    nodes = [NodeWithScore(node=TextNode(text=d)) for d in DOCS]
    out = post.postprocess_nodes(nodes, query_bundle=QueryBundle("cat dog"))
    indices, scores = best("cat dog", 2)
    assert [n.node.get_content() for n in out] == [DOCS[i] for i in indices]
    assert [n.score for n in out] == pytest.approx(scores)
    with pytest.raises(RuntimeError, match="query: must not be empty"):
        post.postprocess_nodes(nodes, query_bundle=QueryBundle(" "))


def test_openai_models_list_and_retrieve(live: str) -> None:
    import openai

    client = openai.OpenAI(base_url=f"{live}/v1", api_key="-", timeout=10, max_retries=0)
    assert [m.id for m in client.models.list().data] == [FAKE_MODEL]
    model = client.models.retrieve(FAKE_MODEL)
    assert model.id == FAKE_MODEL and model.owned_by == "routehead"
    with pytest.raises(openai.NotFoundError, match="not served here"):
        client.models.retrieve("gpt-4o")
