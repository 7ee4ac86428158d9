"""The re-ranking prompt, built from token segments so every span is exact for every tokenizer.

Layout (ICR): ``<chat head> instruction [1] doc1 \\n [2] doc2 ... late-instruction Query:`` | `` <query>``.
Everything before the ``|`` is the *prefix*: it does not depend on the query, and the real query and the
content-free calibration query ("N/A") both follow it, at the same positions, in one pass (see ``scorer``).
The query tokens are the *suffix*. The chat template's tail (end of turn, assistant header) comes after the
query; under causal attention it cannot change the query rows, so it is kept in :attr:`Prompt.tail_ids` but
never run.

Each segment is tokenized on its own and the ids are concatenated, so a document's span is known by
construction (no offset arithmetic per tokenizer family). Segments start with a space or newline where text
naturally would, so the tokens are the ones the model would see in running text.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from routehead.errors import RouteheadError

PROMPT_VERSION = "icr-v1"
INSTRUCTION = "Here are some paragraphs:\n\n"
LATE_INSTRUCTION = ("\nPlease find information that are relevant to the following query in the paragraphs above."
                    "\n\nQuery:")
NA_QUERY = "N/A"
_SENTINEL = "\u2063ROUTEHEAD_USER_CONTENT\u2063"


@dataclass
class Prompt:
    """Token ids of one prompt, with exact spans. Positions are absolute (the suffix follows the prefix)."""

    prefix_ids: list[int]
    doc_spans: list[tuple[int, int]]  # [start, end) in the prefix, one per document, in input order
    query_ids: list[int]  # the real query's suffix: exactly the query tokens
    na_ids: list[int]  # the calibration query's suffix
    tail_ids: list[int] = field(default_factory=list)
    truncated: list[bool] = field(default_factory=list)  # per document: was it cut to max_doc_tokens

    @property
    def prefix_len(self) -> int:
        return len(self.prefix_ids)

    @property
    def length(self) -> int:
        """Tokens actually run for the real query: prefix + query."""
        return len(self.prefix_ids) + len(self.query_ids)

    def full_ids(self, calibration: bool = False) -> list[int]:
        """The whole prompt as a model would see it (for reference passes and tests)."""
        return self.prefix_ids + (self.na_ids if calibration else self.query_ids) + self.tail_ids


class PromptBuilder:
    """Tokenizes segments once per call and assembles :class:`Prompt` objects; knows the chat template."""

    def __init__(self, tokenizer: Any, max_doc_tokens: int | None = 300, max_query_tokens: int = 128,
                 use_chat_template: bool = True) -> None:
        self.tok = tokenizer
        self.max_doc_tokens = max_doc_tokens
        self.max_query_tokens = max_query_tokens
        self.head_ids, self.tail_ids = self._template(use_chat_template)
        self.instruction_ids = self._encode(INSTRUCTION)
        self.late_ids = self._encode(LATE_INSTRUCTION)
        self.newline_ids = self._encode("\n")

    def _encode(self, text: str) -> list[int]:
        return list(self.tok(text, add_special_tokens=False)["input_ids"])

    def _encode_many(self, texts: Sequence[str]) -> list[list[int]]:
        if not texts:
            return []
        return [list(ids) for ids in self.tok(list(texts), add_special_tokens=False)["input_ids"]]

    def _template(self, use_chat_template: bool) -> tuple[list[int], list[int]]:
        """Split the chat template around the user message; plain text (with BOS if the model uses one) otherwise."""
        if use_chat_template and getattr(self.tok, "chat_template", None):
            text = self.tok.apply_chat_template([{"role": "user", "content": _SENTINEL}], tokenize=False,
                                                add_generation_prompt=True)
            if isinstance(text, str) and text.count(_SENTINEL) == 1:
                head, tail = text.split(_SENTINEL)
                return self._encode(head), self._encode(tail)
        bos = getattr(self.tok, "bos_token_id", None)
        probe = list(self.tok("a", add_special_tokens=True)["input_ids"])
        head = [bos] if bos is not None and probe and probe[0] == bos else []
        return head, []

    def fixed_tokens(self, n_docs: int, query_tokens: int) -> int:
        """Tokens a prompt of ``n_docs`` documents needs besides the documents' own text."""
        marker = len(self._encode(" [1]")) + 1
        return (len(self.head_ids) + len(self.instruction_ids) + len(self.late_ids) + query_tokens
                + n_docs * (marker + len(self.newline_ids)))

    def encode_query(self, query: str) -> list[int]:
        if not isinstance(query, str) or not query.strip():
            raise RouteheadError("the query is empty")
        ids = self._encode(" " + query.strip())
        return ids[: self.max_query_tokens]

    def encode_documents(self, documents: Sequence[str]) -> tuple[list[list[int]], list[bool]]:
        if isinstance(documents, str) or not isinstance(documents, Sequence):
            raise RouteheadError("documents must be a list of strings")
        if len(documents) == 0:
            raise RouteheadError("no documents to rank")
        for i, d in enumerate(documents):
            if not isinstance(d, str):
                raise RouteheadError(f"document {i} is a {type(d).__name__}, not a string")
        ids = self._encode_many([" " + (d.strip() or "(empty)") for d in documents])
        cut = self.max_doc_tokens
        truncated = [cut is not None and len(x) > cut for x in ids]
        if cut is not None:
            ids = [x[:cut] for x in ids]
        return ids, truncated

    def build(self, query_ids: list[int], doc_ids: Sequence[list[int]], truncated: Sequence[bool] | None = None,
              numbering_start: int = 1) -> Prompt:
        """Assemble a prompt from pre-tokenized query and documents (so windows reuse the tokenization)."""
        prefix = list(self.head_ids) + list(self.instruction_ids)
        spans = []
        markers = self._encode_many([f"[{numbering_start + i}]" for i in range(len(doc_ids))])
        for marker, ids in zip(markers, doc_ids):
            prefix += marker
            spans.append((len(prefix), len(prefix) + len(ids)))
            prefix += ids
            prefix += self.newline_ids
        prefix += self.late_ids
        return Prompt(prefix_ids=prefix, doc_spans=spans, query_ids=list(query_ids),
                      na_ids=self._encode(" " + NA_QUERY), tail_ids=list(self.tail_ids),
                      truncated=list(truncated) if truncated is not None else [False] * len(doc_ids))


def plan_windows(doc_lengths: Sequence[int], fixed_per_doc: int, fixed: int, budget: int) -> list[list[int]]:
    """Split documents (in input order) into the fewest contiguous, near-equal-size windows that fit ``budget``.

    Near-equal sizes matter: a document's calibrated attention is its share of a mass spread over the window's
    documents, so windows of similar size give similar competition (see :func:`routehead.scorer` for the
    rescaling that makes scores from different windows comparable).
    """
    n = len(doc_lengths)
    need = [length + fixed_per_doc for length in doc_lengths]
    for i, k in enumerate(need):
        if fixed + k > budget:
            raise RouteheadError(
                f"document {i} needs {k} tokens but the prompt budget is {budget - fixed} tokens after the "
                f"instruction and query; set max_doc_tokens (per-document truncation) or use a longer-context model")
    for w in range(1, n + 1):
        bounds = [round(j * n / w) for j in range(w + 1)]
        windows = [list(range(bounds[j], bounds[j + 1])) for j in range(w)]
        if all(fixed + sum(need[i] for i in win) <= budget for win in windows):
            return windows
    raise AssertionError("unreachable: one document per window always fits")
