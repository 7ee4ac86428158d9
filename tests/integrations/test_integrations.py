"""What the adapters share: building a Reranker from settings, first-stage scores, metadata, missing frameworks."""

from __future__ import annotations

import importlib
import sys

import numpy as np
import pytest

from routehead.errors import RouteheadError
from routehead.integrations import first_stage_scores, load_reranker, ranking_metadata, supports_instruction
from routehead.testing.tiny import tiny_lm
from tests.integrations.adapters_common import DOCS, FIRST_STAGE, QUERY


def test_first_stage_scores_only_when_every_document_has_a_finite_one():
    assert first_stage_scores([1, 2.5]) == [1.0, 2.5]
    assert first_stage_scores([1.0, None]) is None
    assert first_stage_scores([1.0, float("nan")]) is None
    assert first_stage_scores([1.0, "2"]) is None
    assert first_stage_scores([True, 1.0]) is None
    assert first_stage_scores([]) is None


def test_load_reranker_shares_a_reranker_and_calls_factories(rr):
    assert load_reranker(rr) is rr and load_reranker(lambda: rr) is rr
    built = load_reranker(lambda: tiny_lm("llama"), method="icr")
    assert built.method == "icr" and built.lm.name == "tiny-llama"


def test_ranking_metadata_names_heads_and_first_stage(rr):
    r = rr.rerank(QUERY, DOCS, first_stage_scores=FIRST_STAGE)
    assert r.first_stage  # the tiny router routes the first-stage score
    meta = ranking_metadata(r, 0)
    assert meta["relevance_score"] == r.scores[0]
    assert meta["routed_heads"] == [list(h) for h in r.heads] and meta["first_stage_used"] is True
    assert len(meta["head_weights"]) == len(r.heads)


def test_instruction_reaches_the_prompt():
    if not supports_instruction():
        pytest.skip("this routehead's Reranker has no instruction setting")
    rr = load_reranker(tiny_lm("llama"), method="icr", instruction="Find the passage that answers the question.")
    assert rr.scorer.builder.settings()["late_instruction"] == "Find the passage that answers the question."


def test_instruction_is_passed_only_where_the_reranker_takes_it(monkeypatch):
    import routehead.api

    if not supports_instruction():
        with pytest.raises(RouteheadError, match="no instruction setting"):
            load_reranker(tiny_lm("llama"), method="icr", instruction="Find the passage that answers.")
    seen = {}

    class WithInstruction(routehead.api.Reranker):
        def __init__(self, *args, instruction=None, **kwargs):
            seen["instruction"] = instruction
            kwargs.pop("instruction", None)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(routehead.api, "Reranker", WithInstruction)
    rr = load_reranker(tiny_lm("llama"), method="icr", instruction="Find the passage that answers.")
    assert seen["instruction"] == "Find the passage that answers." and rr.method == "icr"
    load_reranker(tiny_lm("llama"), method="icr")
    assert seen["instruction"] is None
    with pytest.raises(RouteheadError, match="already built"):
        load_reranker(rr, instruction="x")


@pytest.mark.parametrize("module,extra,framework", [
    ("langchain", "langchain", "langchain_core"), ("llamaindex", "llamaindex", "llama_index"),
    ("haystack", "haystack", "haystack"), ("rerankers", "rerankers", "rerankers")])
def test_missing_framework_names_the_extra(monkeypatch, module, extra, framework):
    for name in list(sys.modules):
        if name == framework or name.startswith(framework + "."):
            monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, framework if framework != "llama_index" else "llama_index.core", None)
    if framework == "llama_index":
        monkeypatch.setitem(sys.modules, "llama_index", None)
    monkeypatch.delitem(sys.modules, f"routehead.integrations.{module}", raising=False)
    with pytest.raises(ImportError, match=rf"routehead\[{extra}\]"):
        importlib.import_module(f"routehead.integrations.{module}")
    monkeypatch.delitem(sys.modules, f"routehead.integrations.{module}", raising=False)


def _adapter(framework: str, **settings):
    """Each framework's adapter built from the same settings, and the Reranker it scores with."""
    if framework == "langchain":
        from routehead.integrations.langchain import RouteheadCompressor
        return RouteheadCompressor(**settings).reranker
    if framework == "llamaindex":
        from routehead.integrations.llamaindex import RouteheadRerank
        return RouteheadRerank(**settings).reranker
    if framework == "haystack":
        from routehead.integrations.haystack import RouteheadRanker
        ranker = RouteheadRanker(**settings)
        ranker.warm_up()
        return ranker._reranker
    from routehead.integrations.rerankers import RouteheadRanker as RerankersRanker
    return RerankersRanker(**settings).reranker


@pytest.mark.parametrize("framework,module", [("langchain", "langchain_core"), ("llamaindex", "llama_index.core"),
                                              ("haystack", "haystack"), ("rerankers", "rerankers")])
def test_layout_reaches_the_prompt_through_every_adapter(framework, module):
    pytest.importorskip(module)
    lm = tiny_lm("llama")
    assert _adapter(framework, model=lm, method="icr", layout="v1").scorer.builder.layout == "v1"
    assert _adapter(framework, model=lm, method="icr").scorer.builder.layout == "reference"
    with pytest.raises(RouteheadError, match="unknown prompt layout"):
        _adapter(framework, model=lm, method="icr", layout="v2")


def test_layout_cannot_be_applied_to_a_built_reranker(rr):
    with pytest.raises(RouteheadError, match="already built"):
        load_reranker(rr, layout="v1")


def test_haystack_layout_survives_serialisation():
    pytest.importorskip("haystack")
    from routehead.integrations.haystack import RouteheadRanker

    data = RouteheadRanker(model="smollm2-135m", layout="v1").to_dict()
    assert data["init_parameters"]["layout"] == "v1"
    assert RouteheadRanker.from_dict(data).layout == "v1"


@pytest.mark.parametrize("framework,module", [("langchain", "langchain_core"), ("llamaindex", "llama_index.core"),
                                              ("haystack", "haystack"), ("rerankers", "rerankers")])
def test_max_chunks_per_doc_reaches_the_prompt_through_every_adapter(framework, module):
    pytest.importorskip(module)
    lm = tiny_lm("llama")
    assert _adapter(framework, model=lm, method="icr", max_chunks_per_doc=3).scorer.builder.max_chunks_per_doc == 3
    assert _adapter(framework, model=lm, method="icr").scorer.builder.max_chunks_per_doc == 1
    with pytest.raises(RouteheadError, match="max_chunks_per_doc"):
        _adapter(framework, model=lm, method="icr", max_chunks_per_doc=0)


def test_chunking_cannot_be_applied_to_a_built_reranker_and_survives_serialisation(rr):
    with pytest.raises(RouteheadError, match="already built"):
        load_reranker(rr, max_chunks_per_doc=2)
    pytest.importorskip("haystack")
    from routehead.integrations.haystack import RouteheadRanker

    data = RouteheadRanker(model="smollm2-135m", max_chunks_per_doc=2).to_dict()
    assert RouteheadRanker.from_dict(data).max_chunks_per_doc == 2


def test_without_first_stage_scores_the_order_is_the_first_stage(rr):
    """A router that routes the first stage reads the documents' order as its ranking when no scores come: the
    same ranking as scores falling linearly with the rank (their z-scores are equal), not the heads alone."""
    linear = rr.rerank(QUERY, DOCS, first_stage_scores=[10.0 - 2 * i for i in range(len(DOCS))])
    bare = rr.rerank(QUERY, DOCS)
    assert bare.first_stage and bare.indices == linear.indices
    np.testing.assert_allclose(bare.scores, linear.scores, rtol=1e-12)
    assert bare.scores != rr.rerank(QUERY, DOCS, first_stage_scores=FIRST_STAGE).scores
