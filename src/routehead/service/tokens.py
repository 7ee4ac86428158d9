"""Per-request truncation: Cohere's ``max_tokens_per_doc``.

Token counts are the reranker's own (``RerankerLike.prompt_tokens``); this module only cuts documents a client
asked to be cut.  It cuts with the reranker's fast tokenizer where the reranker exposes one (routehead's
``Reranker`` does, as ``lm.tokenizer``), at the character offset where the first ``max_tokens`` tokens end, so
the kept text is exactly a prefix of what the client sent; otherwise at 4 characters a token.

It cuts with its own copy of that tokenizer, one call at a time: encoding sets a flag on the tokenizer object
(``split_special_tokens``) that the model's prompt building flips too, so sharing the object with a running
re-rank could change the tokens of either.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Sequence
from typing import Any

CHARS_PER_TOKEN = 4  # the cut without a tokenizer


class Truncator:
    """Cuts documents to a number of tokens of the served reranker's tokenizer (see the module docstring)."""

    def __init__(self, reranker: Any) -> None:
        tokenizer = getattr(getattr(reranker, "lm", None), "tokenizer", None)
        self._source = tokenizer if getattr(tokenizer, "is_fast", False) else None
        self._tokenizer: Any = None
        self._lock = threading.Lock()

    def __call__(self, texts: Sequence[str], max_tokens: int) -> list[str]:
        """Each text cut after its first ``max_tokens`` tokens."""
        if self._source is None:
            return [t[: max_tokens * CHARS_PER_TOKEN] for t in texts]
        with self._lock:
            if self._tokenizer is None:
                self._tokenizer = copy.deepcopy(self._source)
            enc = self._tokenizer(list(texts), add_special_tokens=False, return_offsets_mapping=True)
        return [text if len(offsets) <= max_tokens else text[: offsets[max_tokens - 1][1]]
                for text, offsets in zip(texts, enc["offset_mapping"])]
