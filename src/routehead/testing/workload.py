"""Queries and documents to time a pass on: deterministic synthetic text sized in a model's tokens, or SciFact.

Synthetic documents are pseudo-words from a fixed syllable list, seeded, so a prompt of a given size is the same
text on every machine; :func:`sized_docs` sizes them in the scorer's own tokenizer and :func:`docs_for_tokens`
builds a whole prompt of about ``T`` tokens. :class:`SciFact` gives real queries with their judged documents
first, then corpus documents from a query-dependent offset.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from routehead.engine.scorer import HeadScorer
from routehead.errors import RouteheadError
from routehead.offline.data import doc_text

SYNTH_QUERY = "Which paragraph describes how the protein complex regulates cell growth?"
SYLLABLES = ["pro", "te", "in", "cel", "lu", "lar", "gen", "ex", "pres", "sion", "ma", "cro", "pha", "ge", "ki",
             "nase", "re", "cep", "tor", "sig", "nal", "ing", "mi", "to", "chon", "dri", "al", "the", "of", "and"]


def synthetic_text(n_words: int, seed: int) -> str:
    """``n_words`` pseudo-words in sentences of 8 to 16 words, the same for the same seed."""
    rng = random.Random(seed)
    words = ["".join(rng.choice(SYLLABLES) for _ in range(rng.randint(1, 3))) for _ in range(n_words)]
    sentences, i = [], 0
    while i < len(words):
        k = rng.randint(8, 16)
        chunk = words[i:i + k]
        sentences.append(chunk[0].capitalize() + " " + " ".join(chunk[1:]) if len(chunk) > 1 else chunk[0])
        i += k
    return ". ".join(sentences) + "."


def cut_words(text: str, n: int) -> str:
    return " ".join(text.split()[:n])


def text_tokens(scorer: HeadScorer, text: str) -> int:
    """Tokens of ``text`` alone, as user text, in the scorer's tokenizer."""
    return len(scorer.builder.tok(text, add_special_tokens=False, split_special_tokens=True)["input_ids"])


def sized_docs(scorer: HeadScorer, n_docs: int, doc_tokens: float, seed: int) -> list[str]:
    """``n_docs`` synthetic documents of about ``doc_tokens`` tokens each in the scorer's tokenizer."""
    sample = synthetic_text(400, seed=10**6 + seed)
    per_word = text_tokens(scorer, " " + sample) / 400
    words = max(1, round(doc_tokens / per_word))
    docs = [synthetic_text(words, seed * 100_003 + k) for k in range(n_docs)]
    got = sum(scorer.builder.prepare_documents(docs)[1]) / n_docs
    if got > 0 and abs(got - doc_tokens) > 2:  # one correction step for the tokenizer's actual rate
        words = max(1, round(words * doc_tokens / got))
        docs = [synthetic_text(words, seed * 100_003 + k) for k in range(n_docs)]
    return docs


def docs_for_tokens(scorer: HeadScorer, tokens: int, n_docs: int | None, doc_tokens: int, seed: int = 0
                    ) -> tuple[str, list[str]]:
    """A synthetic query and documents whose prompt (prefix + query) is about ``tokens`` tokens: ``n_docs``
    documents, or as many of about ``doc_tokens`` tokens as fit.

    Within the scorer's budget the prompt is kept to one window (the last documents lose a word each until the
    plan fits): the scorer plans windows from an upper estimate of the prompt's length (:meth:`HeadScorer.plan`),
    which can exceed the budget when the prompt itself does not (SmolLM2 at 8192: 8133 tokens, planned 8196, so
    the scoring methods ran two passes of ~4.1k tokens instead of the 8k one asked for; now 8129 tokens)."""
    b = scorer.builder
    per_doc_fixed = b.fixed_tokens(1, SYNTH_QUERY) - b.fixed_tokens(0, SYNTH_QUERY)
    n = n_docs or max(1, round((tokens - b.fixed_tokens(0, SYNTH_QUERY)) / (doc_tokens + per_doc_fixed)))
    room = tokens - b.fixed_tokens(n, SYNTH_QUERY)
    if room < n:
        raise RouteheadError(f"{tokens} tokens is too small a prompt for {n} documents")
    docs = sized_docs(scorer, n, room / n, seed)
    for k in range(10 * n if tokens <= scorer.budget else 0):  # a word off the documents in turn, last first
        if len(scorer.plan(SYNTH_QUERY, docs)[2]) == 1:
            break
        i = n - 1 - k % n
        docs[i] = cut_words(docs[i], max(1, len(docs[i].split()) - 1))
    return SYNTH_QUERY, docs


class SciFact:
    """The SciFact corpus (file order), test queries (qrels order) and their judged documents."""

    def __init__(self, root: Path) -> None:
        d = Path(root) / "scifact"
        self.docs: list[tuple[str, str]] = []
        with open(d / "corpus.jsonl", encoding="utf-8") as f:
            for line in f:
                row = json.loads(line)
                self.docs.append((str(row["_id"]), doc_text(row)))
        self.index = {did: i for i, (did, _) in enumerate(self.docs)}
        queries = {}
        with open(d / "queries.jsonl", encoding="utf-8") as f:
            for line in f:
                row = json.loads(line)
                queries[str(row["_id"])] = row["text"]
        self.qrels: dict[str, list[str]] = {}
        with open(d / "qrels" / "test.tsv", encoding="utf-8") as f:
            for line in f:
                parts = line.rstrip("\n").split("\t")
                if len(parts) < 3 or parts[0] == "query-id" or float(parts[2]) <= 0:
                    continue
                self.qrels.setdefault(parts[0], []).append(parts[1])
        self.queries = [(qid, queries[qid]) for qid in self.qrels if qid in queries]

    def case(self, i: int, n_docs: int, words: int) -> tuple[str, list[str]]:
        """Query ``i``: its judged documents first, then corpus documents from offset ``i * 997``."""
        qid, query = self.queries[i % len(self.queries)]
        picked = [self.index[d] for d in self.qrels[qid] if d in self.index][:n_docs]
        j = (i * 997) % len(self.docs)
        while len(picked) < n_docs:
            if j not in picked:
                picked.append(j)
            j = (j + 1) % len(self.docs)
        return query, [cut_words(self.docs[k][1], words) for k in picked]
