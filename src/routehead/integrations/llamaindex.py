"""LlamaIndex: routehead as a node postprocessor (``node_postprocessors=[RouteheadRerank(...)]``).

Behaves like LlamaIndex's own ``SentenceTransformerRerank`` (``pip install 'routehead[llamaindex]'``): ``top_n``,
``keep_retrieval_score`` (the retriever's score kept as ``metadata["retrieval_score"]``), the same RERANKING
callback event and the ``ReRankStartEvent``/``ReRankEndEvent`` instrumentation events, so tracing and
observability handlers see it as a re-ranker. Each node's ``score`` becomes the routehead score; the routed
heads go to ``metadata["routed_heads"]``, excluded from the text an LLM or an embedder sees.

The retriever's node scores, when every node has one, are passed on as ``first_stage_scores``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from routehead.integrations import HEADS_KEY, WEIGHTS_KEY, first_stage_scores, ranking_metadata, require, reranker_for

require("llama_index.core", "llamaindex")

from llama_index.core.bridge.pydantic import Field, PrivateAttr  # noqa: E402
from llama_index.core.callbacks import CBEventType, EventPayload  # noqa: E402
from llama_index.core.instrumentation import get_dispatcher  # noqa: E402
from llama_index.core.instrumentation.events.rerank import ReRankEndEvent, ReRankStartEvent  # noqa: E402
from llama_index.core.postprocessor.types import BaseNodePostprocessor  # noqa: E402
from llama_index.core.schema import MetadataMode, NodeWithScore, QueryBundle  # noqa: E402

__all__ = ["RouteheadRerank"]

dispatcher = get_dispatcher(__name__)


class RouteheadRerank(BaseNodePostprocessor):
    """Re-rank retrieved nodes with an attention re-ranker (RouteHead, static heads or ICR).

    ``model`` is anything :func:`routehead.integrations.load_reranker` takes (None: the embedded default). The
    model is loaded on first use.
    """

    model: Any = Field(default=None, description="routehead model: name, path, hub id, LoadedModel, Reranker")
    method: str | None = Field(default=None, description="route | static | icr (default: route with a router, "
                               "static with heads, else icr)")
    router: str | Path | None = Field(default=None, description="router .safetensors (route)")
    heads: Any = Field(default=None, description="head-set JSON or list of (layer, head) (static)")
    max_doc_tokens: int | None = Field(default=None, description="per-document truncation")
    instruction: str | None = Field(default=None, description="the prompt's task instruction")
    device: str | None = Field(default=None)
    dtype: str | None = Field(default=None)
    layout: str | None = Field(default=None, description="prompt layout: reference | v1 (default: the heads' own)")
    max_chunks_per_doc: int | None = Field(default=None, description="long documents: up to this many chunks of "
                                           "max_doc_tokens each, scored by the best (default: truncation)")
    top_n: int = Field(default=2, description="number of nodes to return, best first")
    keep_retrieval_score: bool = Field(default=False, description="keep the retriever's score in metadata")
    _reranker: Any = PrivateAttr(default=None)

    @classmethod
    def class_name(cls) -> str:
        return "RouteheadRerank"

    @property
    def reranker(self) -> Any:
        """The underlying :class:`routehead.Reranker` (built on first access)."""
        if self._reranker is None:
            self._reranker = reranker_for(self)
        return self._reranker

    def _model_name(self) -> str:
        return str(self.reranker.lm.name)

    def _postprocess_nodes(self, nodes: list[NodeWithScore],
                           query_bundle: QueryBundle | None = None) -> list[NodeWithScore]:
        dispatcher.event(ReRankStartEvent(query=query_bundle, nodes=nodes, top_n=self.top_n,
                                          model_name=self._model_name()))
        if query_bundle is None:
            raise ValueError("Missing query bundle in extra info.")
        if not nodes:
            dispatcher.event(ReRankEndEvent(nodes=[]))
            return []
        texts = [n.node.get_content(metadata_mode=MetadataMode.EMBED) for n in nodes]
        fs = first_stage_scores([n.score for n in nodes])
        payload = {EventPayload.NODES: nodes, EventPayload.MODEL_NAME: self._model_name(),
                   EventPayload.QUERY_STR: query_bundle.query_str, EventPayload.TOP_K: self.top_n}
        with self.callback_manager.event(CBEventType.RERANKING, payload=payload) as event:
            ranking = self.reranker.rerank(query_bundle.query_str, texts, first_stage_scores=fs)
            out = []
            for rank, i in enumerate(ranking.indices[:max(0, self.top_n)]):
                node = nodes[i]
                meta = ranking_metadata(ranking, rank)
                if self.keep_retrieval_score:
                    node.node.metadata["retrieval_score"] = node.score
                for key in (HEADS_KEY, WEIGHTS_KEY):
                    if key in meta:
                        node.node.metadata[key] = meta[key]
                        for excluded in (node.node.excluded_llm_metadata_keys, node.node.excluded_embed_metadata_keys):
                            if key not in excluded:
                                excluded.append(key)
                out.append(NodeWithScore(node=node.node, score=meta["relevance_score"]))
            event.on_end(payload={EventPayload.NODES: out})
        dispatcher.event(ReRankEndEvent(nodes=out))
        return out
