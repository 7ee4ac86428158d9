"""LlamaIndex adapter: a BaseNodePostprocessor with SentenceTransformerRerank's events, on a tiny random model."""

from __future__ import annotations

import pytest

pytest.importorskip("llama_index.core")

from llama_index.core.callbacks import CallbackManager, CBEventType, LlamaDebugHandler  # noqa: E402
from llama_index.core.instrumentation import get_dispatcher  # noqa: E402
from llama_index.core.instrumentation.event_handlers import BaseEventHandler  # noqa: E402
from llama_index.core.postprocessor.types import BaseNodePostprocessor  # noqa: E402
from llama_index.core.schema import MetadataMode, NodeWithScore, QueryBundle, TextNode  # noqa: E402

from routehead.integrations.llamaindex import RouteheadRerank  # noqa: E402
from tests.integrations.adapters_common import DOCS, FIRST_STAGE, QUERY, expected  # noqa: E402


def _nodes(scores=FIRST_STAGE):
    return [NodeWithScore(node=TextNode(text=t, id_=f"n{i}"), score=s) for i, (t, s) in enumerate(zip(DOCS, scores))]


class _Events(BaseEventHandler):
    seen: list = []

    @classmethod
    def class_name(cls) -> str:
        return "_Events"

    def handle(self, event, **kwargs) -> None:
        self.seen.append(event.class_name())


def test_postprocessor_matches_the_reranker_and_emits_rerank_events(rr):
    debug = LlamaDebugHandler()
    handler = _Events()
    get_dispatcher("routehead.integrations.llamaindex").add_event_handler(handler)
    post = RouteheadRerank(model=rr, top_n=3, keep_retrieval_score=True, callback_manager=CallbackManager([debug]))
    assert isinstance(post, BaseNodePostprocessor)
    nodes = _nodes()
    out = post.postprocess_nodes(nodes, query_bundle=QueryBundle(QUERY))
    want = expected(rr, fs=FIRST_STAGE)
    assert [n.node.node_id for n in out] == [f"n{i}" for i in want.indices[:3]]
    assert [n.score for n in out] == want.scores[:3]
    top = out[0].node
    assert top.metadata["retrieval_score"] == FIRST_STAGE[want.indices[0]]
    assert top.metadata["routed_heads"] == [list(h) for h in want.heads]
    assert "routed_heads" not in top.get_content(metadata_mode=MetadataMode.LLM)  # kept out of prompts
    starts, ends = debug.get_event_pairs(CBEventType.RERANKING)[0]
    assert starts.payload is not None and ends.payload is not None
    assert {"ReRankStartEvent", "ReRankEndEvent"} <= set(handler.seen)


def test_query_str_and_no_retriever_scores(rr):
    post = RouteheadRerank(model=rr, top_n=len(DOCS))
    out = post.postprocess_nodes(_nodes([None] * len(DOCS)), query_str=QUERY)
    assert [n.score for n in out] == expected(rr).scores
    assert "retrieval_score" not in out[0].node.metadata
    assert post.postprocess_nodes([], query_str=QUERY) == []
    with pytest.raises(ValueError):
        post.postprocess_nodes(_nodes())

