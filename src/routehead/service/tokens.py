"""Token estimates for admission (``max_request_tokens``) and batching (``max_batch_tokens``), and per-request
truncation (Cohere's ``max_tokens_per_doc``).

The estimate uses the reranker's own tokenizer where it has one (``reranker.lm.tokenizer``) and the engine's
per-document cap (``reranker.scorer.builder.max_doc_tokens``), both read with ``getattr`` so any duck-typed
reranker works; without a tokenizer it falls back to 4 characters a token.  It is an estimate of the prompt
(query + documents + a fixed overhead per document), not the engine's exact prompt: it only has to rank
batches by cost and bound compute.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

PER_DOC_OVERHEAD = 4  # "[i] " and the newline around each document
PROMPT_OVERHEAD = 48  # chat template and instructions


class TokenCounter:
    """Counts tokens the way the served reranker will see them (see module docstring)."""

    def __init__(self, reranker: Any) -> None:
        lm = getattr(reranker, "lm", None)
        self.tokenizer = getattr(lm, "tokenizer", None)
        scorer = getattr(reranker, "scorer", None)
        builder = getattr(scorer, "builder", None)
        cap = getattr(builder, "max_doc_tokens", None)
        self.max_doc_tokens: int | None = cap if isinstance(cap, int) and cap > 0 else None

    def lengths(self, texts: Sequence[str]) -> list[int]:
        """Tokens of each text (no special tokens)."""
        if not texts:
            return []
        if self.tokenizer is None:
            return [max(1, len(t) // 4) for t in texts]
        ids = self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]
        return [len(x) for x in ids]

    def prompt_tokens(self, query: str, documents: Sequence[str]) -> int:
        """Estimated prompt length for one request, after the engine's per-document cap."""
        q = self.lengths([query])[0]
        docs = self.lengths(documents)
        if self.max_doc_tokens is not None:
            docs = [min(n, self.max_doc_tokens) for n in docs]
        return PROMPT_OVERHEAD + q + sum(docs) + PER_DOC_OVERHEAD * len(docs)

    def truncate(self, texts: Sequence[str], max_tokens: int) -> list[str]:
        """Cut each text after its first ``max_tokens`` tokens (at the character offset where they end).

        Offsets, not decode(): the kept text is exactly a prefix of what the client sent.  Without a fast
        tokenizer (no offsets) texts are cut at 4 characters a token.
        """
        if self.tokenizer is None or not getattr(self.tokenizer, "is_fast", False):
            return [t[: max_tokens * 4] for t in texts]
        enc = self.tokenizer(list(texts), add_special_tokens=False, return_offsets_mapping=True)
        out = []
        for text, offsets in zip(texts, enc["offset_mapping"]):
            out.append(text if len(offsets) <= max_tokens else text[: offsets[max_tokens - 1][1]])
        return out
