"""The re-ranking prompt of the reference code (ICR / QRHead), tokenized as a whole, with exact token spans.

Text, as ``OSU-NLP-Group/In-Context-Reranking`` (instruct template, query last) and ``princeton-pli/QRHead``
build it::

    <chat head> Here are some paragraphs:{sep}[1] doc1{sep}[2] doc2 ...
    {sep}<late instruction>{sep}Query: <query><chat tail>

``sep`` is ``"\\n\\n"`` (``" \\n\\n"`` for Llama models, as both references do); a document is
``title + "\\n" + text``; the late instruction is ICR's IE text ("Please find information that are relevant to
the following query in the paragraphs above.") or its QA text ("Please answer the following question based on
the information in the paragraphs above."). The document order in the prompt is the caller's (the published
runs put the best first-stage document last: see :mod:`routehead.engine.order`).

Spans, as the references compute them from the tokenization of the whole prompt (character offsets):
- a document's span runs from the token holding the ``[`` of its marker to the token holding its last
  character (so it includes ``[i]``; a token that merges the separator with the marker belongs to it);
- the query span runs from the token holding the late instruction's first character to the last prompt
  token (late instruction, ``Query:``, the query and the chat template's closing tokens).
Everything before the query span is the *prefix*: it does not depend on the query, and the real query's
suffix and the content-free one ("N/A" in place of the query) both follow it (see ``scorer``).

Documents and queries are data: text that spells a control token (``<|im_end|>``) is tokenized as text,
never as the model's special token. When no such text is present the whole prompt is tokenized in one call,
exactly as the references do; otherwise the user content is tokenized with ``split_special_tokens`` between
the chat template's own special tokens.

Long documents (``max_chunks_per_doc`` > 1): a document longer than ``max_doc_tokens`` is split into consecutive
chunks of ``max_doc_tokens`` tokens (counted on the document alone, as :meth:`PromptBuilder._cut` counts), at
most ``max_chunks_per_doc`` of them; each chunk enters the prompt as its own passage (``[i] chunk``), the chunks of
one document adjacent and in reading order, and the document is scored by its best chunk (MaxP, see
:mod:`routehead.engine.scorer`). Chunks do not overlap: a calibrated score is the document's share of the query's
attention, and text present twice in one prompt would split that attention between its two copies. The first
chunk is exactly the truncated document, so a list in which no document is longer than ``max_doc_tokens`` gets
the same prompt, and the same scores, as truncation.

``layout="v1"`` is routehead's layout before it followed the references, kept under its own name because it
measured better on scifact dev (``bench/ablation.py``): every segment (instruction, separator, ``[i]``, document)
tokenized alone and the ids concatenated, documents as ``title. text``, and only the query's own tokens (or
"N/A"'s) as the query span: the late instruction and ``Query:`` end the prefix and the chat tail is not run.
The methods' names (icr, static, route) mean the reference layout; v1 is an option beside it.
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from routehead.errors import RouteheadError
from routehead.locks import lock_for
from routehead.settings import DEFAULT_LAYOUT, DEFAULT_MAX_CHUNKS, DEFAULT_MAX_DOC_TOKENS, SCORING

PROMPT_VERSION = "icr-ref-v1"
LAYOUTS = {"reference": PROMPT_VERSION, "v1": "routehead-v1"}  # layout -> the version stores and assets record
INSTRUCTION = " Here are some paragraphs:"
LATE_INSTRUCTIONS = {
    "IE": "Please find information that are relevant to the following query in the paragraphs above.",
    "QA": "Please answer the following question based on the information in the paragraphs above.",
}
QUERY_LABEL = "Query:"
NA_QUERY = "N/A"
_SENTINEL = "\u2063ROUTEHEAD_USER_CONTENT\u2063"



def tokenizer_lock(tokenizer: Any) -> threading.Lock:
    """The one lock every encode of ``tokenizer`` takes (see :meth:`PromptBuilder._encode`)."""
    return lock_for(tokenizer)

@dataclass
class Prompt:
    """Token ids of one prompt, with exact spans. Positions are absolute (each suffix follows the prefix)."""

    prefix_ids: list[int]
    doc_spans: list[tuple[int, int]]  # [start, end) in the prefix, one per document, in prompt order
    query_ids: list[int]  # the real query's suffix: late instruction .. last prompt token
    na_ids: list[int]  # the same suffix with "N/A" as the query
    truncated: list[bool] = field(default_factory=list)  # per document: was it cut to max_doc_tokens

    @property
    def prefix_len(self) -> int:
        return len(self.prefix_ids)

    @property
    def length(self) -> int:
        """Tokens run for the real query: prefix + its suffix."""
        return len(self.prefix_ids) + len(self.query_ids)

    def full_ids(self, calibration: bool = False) -> list[int]:
        """The whole prompt as a model would see it (for reference passes and tests)."""
        return self.prefix_ids + (self.na_ids if calibration else self.query_ids)


@dataclass
class Chunks:
    """Documents as they go into the prompt, each as one or more chunks (:meth:`PromptBuilder.chunk_documents`).

    Chunk-level lists run document by document (a document's chunks adjacent, in reading order), so chunk ``j``
    belongs to document ``owner[j]`` and ``owner`` is non-decreasing."""

    texts: list[str]  # per chunk, as it goes into the prompt
    lengths: list[int]  # per chunk: its tokens in the document's own tokenization (for planning windows)
    owner: list[int]  # per chunk: the index of its document
    truncated: list[bool]  # per document: was text left out (after its last kept chunk)

    @property
    def counts(self) -> list[int]:
        """Chunks per document."""
        out = [0] * len(self.truncated)
        for d in self.owner:
            out[d] += 1
        return out

    @property
    def cut(self) -> list[bool]:
        """Per chunk: is it its document's last kept chunk with text left out after it (the prompt's flag)."""
        last = {d: j for j, d in enumerate(self.owner)}
        return [self.truncated[d] and last[d] == j for j, d in enumerate(self.owner)]


def document_text(text: str, title: str | None = None) -> str:
    """A document as the references put it in the prompt: ``title + "\\n" + text`` when it has a title (the v1
    layout's ``title. text`` is :func:`routehead.offline.data.doc_text`)."""
    title = (title or "").strip()
    text = (text or "").strip()
    return f"{title}\n{text}" if title else text


def layout_of(version: str | None) -> str:
    """The layout a store or asset recorded as its prompt version (``None``: the default)."""
    for name, v in LAYOUTS.items():
        if v == version:
            return name
    if version is None:
        return DEFAULT_LAYOUT
    raise RouteheadError(f"unknown prompt version {version!r}; this routehead knows {sorted(LAYOUTS.values())}")


class PromptBuilder:
    """Builds :class:`Prompt` objects for one tokenizer: chat template, truncation, spans."""

    def __init__(self, tokenizer: Any, max_doc_tokens: int | None = DEFAULT_MAX_DOC_TOKENS,
                 max_query_tokens: int = 128, use_chat_template: bool = True,
                 retrieval_type: str = SCORING.retrieval_type, instruction: str | None = None,
                 separator: str | None = None, layout: str = DEFAULT_LAYOUT,
                 max_chunks_per_doc: int = DEFAULT_MAX_CHUNKS) -> None:
        check_max_chunks(max_chunks_per_doc)
        if layout not in LAYOUTS:
            raise RouteheadError(f"unknown prompt layout {layout!r}; use one of {sorted(LAYOUTS)}")
        if retrieval_type not in LATE_INSTRUCTIONS:
            raise RouteheadError(f"unknown retrieval_type {retrieval_type!r}; use one of {sorted(LATE_INSTRUCTIONS)}")
        if not getattr(tokenizer, "is_fast", False):
            raise RouteheadError("the prompt needs a fast (Rust) tokenizer for exact character offsets; "
                                 "load it with AutoTokenizer.from_pretrained(..., use_fast=True)")
        if instruction is not None and not instruction.strip():
            raise RouteheadError("the instruction is empty")
        self.tok = tokenizer
        self.layout = layout
        self.max_doc_tokens = max_doc_tokens
        self.max_chunks_per_doc = max_chunks_per_doc
        self.max_query_tokens = max_query_tokens
        self.retrieval_type = retrieval_type
        self.late = instruction.strip() if instruction is not None else LATE_INSTRUCTIONS[retrieval_type]
        name = str(getattr(tokenizer, "name_or_path", "")).lower()
        self.sep = separator if separator is not None else (" \n\n" if "llama" in name else "\n\n")
        self.specials = sorted({t.content for t in getattr(tokenizer, "added_tokens_decoder", {}).values()
                                if getattr(t, "content", "")}, key=len, reverse=True)
        self.head_text, self.tail_text = self._template(use_chat_template)
        self.chat = bool(self.tail_text)
        self.head_ids = self._encode(self.head_text, special=True)

    # -- tokenization ---------------------------------------------------------------------------------------
    def _encode(self, text: str, special: bool, offsets: bool = False) -> Any:
        # a fast tokenizer keeps ``split_special_tokens`` as state of the shared object, set by every call: the
        # setting and the encoding must not interleave with another thread's (a service counts tokens while a
        # pass builds its prompt), so every encode of one tokenizer holds its lock
        with tokenizer_lock(self.tok):
            enc = self.tok(text, add_special_tokens=False, return_offsets_mapping=offsets,
                           split_special_tokens=not special)
        return enc if offsets else list(enc["input_ids"])

    def _template(self, use_chat_template: bool) -> tuple[str, str]:
        """The chat template's text before and after the user message; plain text (BOS if used) otherwise."""
        if use_chat_template and getattr(self.tok, "chat_template", None):
            text = self.tok.apply_chat_template([{"role": "user", "content": _SENTINEL}], tokenize=False,
                                                add_generation_prompt=True)
            if isinstance(text, str) and text.count(_SENTINEL) == 1:
                head, tail = text.split(_SENTINEL)
                return head, tail
        bos = getattr(self.tok, "bos_token", None)
        with tokenizer_lock(self.tok):
            probe = list(self.tok("a", add_special_tokens=True)["input_ids"])
        adds_bos = bos is not None and probe and probe[0] == self.tok.bos_token_id
        return (bos if adds_bos else ""), ""

    def _split_specials(self, text: str, last: bool) -> tuple[str, str]:
        """``text`` cut after its last (``last``) or before its first special-token string: (before, after)."""
        hits = [(text.rfind(s) + len(s)) if last else text.find(s) for s in self.specials if s in text]
        if not hits:
            return ("", text) if last else (text, "")
        cut = max(hits) if last else min(hits)
        return text[:cut], text[cut:]

    def _has_special(self, text: str) -> bool:
        return any(s in text for s in self.specials)

    def _tokenize(self, body: str, chunked: bool) -> tuple[list[int], list[tuple[int, int]], int]:
        """Token ids of ``head + body + tail``, each token's character offsets into that string ((-1, -1) for
        the template's own tokens), and where ``body`` starts in it.

        ``chunked=False``: the whole string in one call, the references' way. ``chunked=True`` (user text that
        spells a special token): the template's special tokens as such, and the text between them, user content
        included, with ``split_special_tokens`` so it stays text.
        """
        full = self.head_text + body + self.tail_text
        if not chunked:
            enc = self._encode(full, special=True, offsets=True)
            return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]], len(self.head_text)
        head_sp, head_plain = self._split_specials(self.head_text, last=True)
        tail_plain, tail_sp = self._split_specials(self.tail_text, last=False)
        pre, post = self._encode(head_sp, special=True), self._encode(tail_sp, special=True)
        enc = self._encode(head_plain + body + tail_plain, special=False, offsets=True)
        shift = len(head_sp)
        offs = [(-1, -1)] * len(pre) + [(a + shift, b + shift) for a, b in enc["offset_mapping"]]
        return pre + list(enc["input_ids"]) + post, offs + [(-1, -1)] * len(post), len(self.head_text)

    # -- inputs ---------------------------------------------------------------------------------------------
    def _cut(self, text: str, limit: int | None) -> tuple[str, bool, int]:
        """``text`` cut to its first ``limit`` tokens (counted on the text alone, as user text) at a character
        boundary, whether it was cut, and its token count."""
        enc = self._encode(text, special=False, offsets=True)
        n = len(enc["input_ids"])
        if limit is None or n <= limit:
            return text, False, n
        return text[: enc["offset_mapping"][limit - 1][1]].rstrip(), True, limit

    def prepare_query(self, query: str) -> str:
        if not isinstance(query, str) or not query.strip():
            raise RouteheadError("the query is empty")
        return self._cut(query.strip(), self.max_query_tokens)[0]

    def _split(self, text: str, limit: int | None, max_chunks: int) -> tuple[list[str], list[int], bool]:
        """``text`` as up to ``max_chunks`` consecutive chunks of ``limit`` tokens (its own tokenization, as user
        text), each cut at character boundaries: the chunks' texts, their token counts, and whether text was left
        out after the last. The first chunk is :meth:`_cut`'s text; a chunk that is only whitespace is dropped."""
        first, cut, n = self._cut(text, limit)
        if not cut or max_chunks == 1:
            return [first], [n], cut
        assert limit is not None
        offsets = self._encode(text, special=False, offsets=True)["offset_mapping"]
        total = len(offsets)
        texts, lengths = [first], [limit]
        for a in range(limit, min(total, max_chunks * limit), limit):
            b = min(a + limit, total)
            chunk = text[offsets[a][0]:offsets[b - 1][1]].strip()
            if chunk:
                texts.append(chunk)
                lengths.append(b - a)
        return texts, lengths, total > max_chunks * limit

    def chunk_documents(self, documents: Sequence[str], max_chunks: int | None = None) -> Chunks:
        """Documents as they go into the prompt (stripped; split into up to ``max_chunks`` chunks of
        ``max_doc_tokens`` tokens, default the builder's ``max_chunks_per_doc``; 1: cut to ``max_doc_tokens``)."""
        if isinstance(documents, str) or not isinstance(documents, Sequence):
            raise RouteheadError("documents must be a list of strings")
        if len(documents) == 0:
            raise RouteheadError("no documents to rank")
        k = self.max_chunks_per_doc if max_chunks is None else check_max_chunks(max_chunks)
        out = Chunks([], [], [], [])
        for i, d in enumerate(documents):
            if not isinstance(d, str):
                raise RouteheadError(f"document {i} is a {type(d).__name__}, not a string")
            texts, lengths, cut = self._split(d.strip(), self.max_doc_tokens, k)
            out.texts += texts
            out.lengths += lengths
            out.owner += [i] * len(texts)
            out.truncated.append(cut)
        return out

    def prepare_documents(self, documents: Sequence[str]) -> tuple[list[str], list[int], list[bool]]:
        """Documents as they go into the prompt when truncated (stripped, cut to ``max_doc_tokens``, whatever
        ``max_chunks_per_doc`` says), their token counts (alone, for planning windows) and whether each was cut."""
        c = self.chunk_documents(documents, 1)
        return c.texts, c.lengths, c.truncated

    def encode_query(self, query: str) -> list[int]:
        """The query's own tokens (router embeddings pool over them)."""
        return self._encode(" " + self.prepare_query(query), special=False)

    def fixed_tokens(self, n_docs: int, query: str) -> int:
        """Tokens a prompt of ``n_docs`` documents needs besides the documents' own text (an upper estimate:
        tokens only merge when tokenized together)."""
        if self.layout == "v1":  # exact: every segment is tokenized alone (the document's leading space may add one)
            enc = lambda t: len(self._encode(t, special=False))  # noqa: E731
            return (len(self.head_ids) + enc(INSTRUCTION) + enc(self.sep) + enc(self.late) + enc(self.sep)
                    + enc(QUERY_LABEL) + enc(" " + query) + n_docs * (enc(self.sep) + enc(f"[{max(n_docs, 1)}]") + 1))
        per_doc = len(self._encode(f"{self.sep}[{max(n_docs, 1)}] ", special=False))
        rest = f"{INSTRUCTION}{self.sep}{self.late}{self.sep}{QUERY_LABEL} {query}"
        return (len(self._encode(self.head_text, special=True)) + len(self._encode(rest, special=False))
                + len(self._encode(self.tail_text, special=True)) + n_docs * per_doc)

    # -- assembly -------------------------------------------------------------------------------------------
    def _body(self, query: str, docs: Sequence[str], start: int) -> tuple[str, list[tuple[int, int]], int]:
        body = INSTRUCTION
        ranges = []
        for i, d in enumerate(docs):
            body += self.sep
            content = f"[{start + i}] {d}".rstrip()
            ranges.append((len(body), len(body) + len(content)))
            body += content
        body += self.sep
        late_at = len(body)
        body += f"{self.late}{self.sep}{QUERY_LABEL} {query}"
        return body, ranges, late_at

    def build(self, query: str, docs: Sequence[str], truncated: Sequence[bool] | None = None,
              numbering_start: int = 1) -> Prompt:
        """The prompt for a prepared query and prepared documents (in prompt order)."""
        if self.layout == "v1":
            return self._build_segments(query, docs, truncated, numbering_start)
        dirty = self._has_special(query) or any(self._has_special(d) for d in docs)
        body, ranges, late_at = self._body(query, docs, numbering_start)
        ids, offs, base = self._tokenize(body, dirty)
        na_body = self._body(NA_QUERY, docs, numbering_start)[0]
        na_ids = self._tokenize(na_body, dirty)[0]

        text_tok = [i for i, (a, _) in enumerate(offs) if a >= 0]  # offsets are non-decreasing over these
        starts, ends = [offs[i][0] for i in text_tok], [offs[i][1] for i in text_tok]

        def first_token(ch: int) -> int:  # the token holding character ``ch`` (or the first after it)
            return text_tok[bisect.bisect_right(ends, ch)]

        def last_token(ch_end: int) -> int:  # the token holding character ``ch_end - 1``
            return text_tok[bisect.bisect_left(starts, ch_end) - 1]

        q0 = first_token(base + late_at)
        if na_ids[:q0] != ids[:q0]:
            raise RouteheadError("the tokenizer merges the query into the documents' tokens; the shared prefix "
                                 "of the query and the 'N/A' prompt differs")
        spans = [(first_token(base + a), last_token(base + b) + 1) for a, b in ranges]
        return Prompt(prefix_ids=ids[:q0], doc_spans=spans, query_ids=ids[q0:], na_ids=na_ids[q0:],
                      truncated=list(truncated) if truncated is not None else [False] * len(docs))

    def segment_body(self, docs: Sequence[str], numbering_start: int = 1) -> tuple[list[int], list[tuple[int, int]]]:
        """The v1 layout up to the separator after the last document: chat head, instruction, ``[i] doc`` per
        document, each segment tokenized alone as text (so no special token can appear; spans exact by
        construction), and the documents' spans."""
        ids = list(self.head_ids) + self._encode(INSTRUCTION, special=False)
        spans = []
        for i, d in enumerate(docs):
            ids += self._encode(self.sep, special=False)
            start = len(ids)
            ids += self._encode(f"[{numbering_start + i}]", special=False)
            ids += self._encode(" " + d, special=False) if d else []
            spans.append((start, len(ids)))
        return ids + self._encode(self.sep, special=False), spans

    def _build_segments(self, query: str, docs: Sequence[str], truncated: Sequence[bool] | None,
                        numbering_start: int) -> Prompt:
        """The v1 layout: :meth:`segment_body`, then the late instruction and ``Query:`` end the prefix; the query
        span is only the query's tokens."""
        enc = lambda t: self._encode(t, special=False)  # noqa: E731
        ids, spans = self.segment_body(docs, numbering_start)
        ids += enc(self.late) + enc(self.sep) + enc(QUERY_LABEL)
        return Prompt(prefix_ids=ids, doc_spans=spans, query_ids=enc(" " + query), na_ids=enc(" " + NA_QUERY),
                      truncated=list(truncated) if truncated is not None else [False] * len(docs))

    def prompt(self, query: str, documents: Sequence[str]) -> Prompt:
        """:meth:`build` from raw inputs (one window, documents in prompt order)."""
        texts, _, truncated = self.prepare_documents(documents)
        return self.build(self.prepare_query(query), texts, truncated)

    def settings(self) -> dict[str, Any]:
        """Everything in the prompt that changes scores (for stores and checkpoints). ``max_chunks_per_doc`` is
        named only when it chunks (> 1): truncation is what every store made before chunking holds, so they keep
        their keys, and a chunked store never shares one with a truncated one."""
        out = {"prompt": LAYOUTS[self.layout], "max_doc_tokens": self.max_doc_tokens,
               "max_query_tokens": self.max_query_tokens, "late_instruction": self.late, "separator": self.sep,
               "chat_template": self.chat}
        if self.max_chunks_per_doc > 1:
            out["max_chunks_per_doc"] = self.max_chunks_per_doc
        return out


def check_max_chunks(value: Any) -> int:
    """``max_chunks_per_doc`` validated: an int >= 1 (1 = truncation)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise RouteheadError(f"max_chunks_per_doc must be an integer >= 1 (1: truncation), got {value!r}")
    return value


def plan_windows(doc_lengths: Sequence[int], fixed_per_doc: int, fixed: int, budget: int,
                 groups: Sequence[int] | None = None) -> list[list[int]]:
    """Split passages (in prompt order) into the fewest contiguous, near-equal-size windows that fit ``budget``.

    Near-equal sizes matter: a document's calibrated attention is its share of a mass spread over the window's
    documents, so windows of similar size give similar competition (see :mod:`routehead.engine.scorer` for the
    rescaling that makes scores from different windows comparable).

    ``groups`` (non-decreasing, one per passage: the chunks of a document, :class:`Chunks`'s ``owner``) keeps each
    group in one window, so a document's chunks compete in the same prompt; windows are then near-equal in groups.
    """
    groups = list(range(len(doc_lengths))) if groups is None else list(groups)
    members: dict[int, list[int]] = {}
    for i, g in enumerate(groups):
        members.setdefault(g, []).append(i)
    blocks = list(members.values())
    n = len(blocks)
    need = [sum(doc_lengths[i] + fixed_per_doc for i in block) for block in blocks]
    for g, k in zip(members, need):
        if fixed + k > budget:
            what = "max_doc_tokens (per-document truncation)" if len(members[g]) == 1 else \
                f"max_chunks_per_doc (it has {len(members[g])} chunks) or max_doc_tokens lower"
            raise RouteheadError(
                f"document {g} needs {k} tokens but the prompt budget is {budget - fixed} tokens after the "
                f"instruction and query; set {what} or use a longer-context model")
    for w in range(1, n + 1):
        bounds = [round(j * n / w) for j in range(w + 1)]
        windows = [list(range(bounds[j], bounds[j + 1])) for j in range(w)]
        if all(fixed + sum(need[i] for i in win) <= budget for win in windows):
            return [[i for b in win for i in blocks[b]] for win in windows]
    raise AssertionError("unreachable: one document per window always fits")
