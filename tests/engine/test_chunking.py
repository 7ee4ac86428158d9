"""Long documents split into chunks (``max_chunks_per_doc``), each its own passage, scored by the best (MaxP)."""

from __future__ import annotations

import pytest
import torch

from routehead.engine.aggregate import HeadSet
from routehead.engine.evidence import document_evidence
from routehead.engine.prompt import PromptBuilder, plan_windows
from routehead.engine.scorer import HeadScorer
from routehead.errors import RouteheadError
from routehead.testing import byte_tokenizer
from routehead.testing.tiny import tiny_lm

LONG = "".join(f"sentence {i} of a long document about cells. " for i in range(6))  # 6 x 40 bytes
DOCS = ["a short one about dogs", LONG, "another short document on proteins"]
SETS = [HeadSet.of(None), HeadSet.of([(0, 1), (2, 3)])]


@pytest.fixture(scope="module")
def lm():
    return tiny_lm("llama")


def test_chunks_split_exactly_at_token_boundaries():
    """A byte tokenizer makes a token a character: chunk j is characters [j*L, (j+1)*L) of the stripped text
    (whitespace at the cut stripped), at most k chunks, the rest flagged as left out; short documents stay whole;
    the chunks of a document are adjacent, in reading order."""
    b = PromptBuilder(byte_tokenizer(), max_doc_tokens=50, max_chunks_per_doc=3)
    c = b.chunk_documents(DOCS)
    assert c.owner == [0, 1, 1, 1, 2] and c.counts == [1, 3, 1]
    assert c.texts[0] == DOCS[0] and c.texts[4] == DOCS[2]
    assert c.texts[1:4] == [LONG[j * 50:(j + 1) * 50].strip() for j in range(3)]
    assert c.lengths == [len(DOCS[0]), 50, 50, 50, len(DOCS[2])]
    assert c.truncated == [False, True, False] and c.cut == [False, False, False, True, False]
    # enough chunks for the whole document: nothing left out, the last chunk the remainder
    whole = b.chunk_documents([LONG], 10)
    text = LONG.strip()
    assert whole.counts == [-(-len(text) // 50)] and whole.truncated == [False]
    assert whole.texts == [text[a:a + 50].strip() for a in range(0, len(text), 50)]
    assert whole.lengths[-1] == len(text) % 50
    # one chunk is truncation, as prepare_documents gives it
    one = b.chunk_documents(DOCS, 1)
    assert (one.texts, one.lengths, one.truncated) == b.prepare_documents(DOCS)
    with pytest.raises(RouteheadError, match="max_chunks_per_doc"):
        b.chunk_documents(DOCS, 0)
    with pytest.raises(RouteheadError, match="max_chunks_per_doc"):
        PromptBuilder(byte_tokenizer(), max_chunks_per_doc=True)


def test_real_tokenizer_chunks_cover_the_document(default_lm):
    """On the default model's BPE tokenizer: the chunks follow each other without a gap or an overlap, each about
    max_doc_tokens tokens, and the first one is the truncated document."""
    b = PromptBuilder(default_lm.tokenizer, max_doc_tokens=40, max_chunks_per_doc=20)
    text = " ".join(f"The protein number {i} binds to receptor {i * 7} in human cells." for i in range(20))
    c = b.chunk_documents([text])
    assert c.texts[0] == b.prepare_documents([text])[0][0]
    assert "".join(c.texts).replace(" ", "") == text.replace(" ", "") and c.truncated == [False]  # cuts may split words
    for t in c.texts[:-1]:
        assert abs(len(b._encode(t, special=False)) - 40) <= 1


test_real_tokenizer_chunks_cover_the_document = pytest.mark.slow(test_real_tokenizer_chunks_cover_the_document)


def test_maxp_is_the_best_chunk_scored_as_its_own_document(lm):
    """A chunked document's score (every head set, and each head alone) is the maximum of its chunks' scores, the
    chunks scored as separate documents in the same prompt; the best chunk is reported."""
    sc = HeadScorer(lm, max_doc_tokens=50, max_chunks_per_doc=3)
    chunks = sc.builder.chunk_documents(DOCS)
    S = sc.score("cells", DOCS, sets=SETS)
    ref = HeadScorer(lm, max_doc_tokens=50).score("cells", chunks.texts, sets=SETS)
    assert S.chunks == [1, 3, 1] and S.truncated == [False, True, False] and S.num_docs == 3
    for d, (a, b) in enumerate([(0, 1), (1, 4), (4, 5)]):
        assert torch.equal(S.sets[:, d], ref.sets[:, a:b].amax(-1))
        assert torch.equal(S.calibrated[..., d], ref.calibrated[..., a:b].amax(-1))
        assert torch.equal(S.raw_sum[..., d], ref.raw_sum[..., a:b].amax(-1))
        assert torch.equal(S.best_chunk[:, d], ref.sets[:, a:b].argmax(-1))
    # one pass per call: the chunks are in one window, the prompt the one of the chunks as documents
    assert S.windows == [[0, 1, 2, 3, 4]] and S.prompt_tokens == ref.prompt_tokens


def test_no_long_document_no_change(lm):
    """Documents within max_doc_tokens get today's prompt and scores whatever max_chunks_per_doc says; and
    max_chunks_per_doc 1 is truncation, per call or per scorer."""
    short = [DOCS[0], DOCS[2], "a third one"]
    base = HeadScorer(lm, max_doc_tokens=50).score("dogs", short, sets=SETS)
    got = HeadScorer(lm, max_doc_tokens=50, max_chunks_per_doc=3).score("dogs", short, sets=SETS)
    assert torch.equal(base.sets, got.sets) and torch.equal(base.calibrated, got.calibrated)
    assert got.chunks == [1, 1, 1] and base.chunks == [] and base.best_chunk is None
    trunc = HeadScorer(lm, max_doc_tokens=50).score("cells", DOCS, sets=SETS)
    per_call = HeadScorer(lm, max_doc_tokens=50, max_chunks_per_doc=3).score("cells", DOCS, sets=SETS,
                                                                             max_chunks_per_doc=1)
    assert torch.equal(trunc.sets, per_call.sets) and per_call.truncated == [False, True, False]


def test_chunks_share_a_window_and_the_budget_is_respected(lm):
    """Past the prompt budget, windows split between documents, never inside one's chunks; a document whose chunks
    alone do not fit is refused with a message naming max_chunks_per_doc."""
    assert plan_windows([5, 5, 5, 5], 1, 10, 25, groups=[0, 1, 1, 2]) == [[0], [1, 2], [3]]
    assert plan_windows([5, 5, 5, 5], 1, 10, 100, groups=[0, 1, 1, 2]) == [[0, 1, 2, 3]]
    with pytest.raises(RouteheadError, match="max_chunks_per_doc"):
        plan_windows([5, 5, 5], 1, 10, 20, groups=[0, 0, 0])
    sc = HeadScorer(lm, max_doc_tokens=50, max_chunks_per_doc=3, max_prompt_tokens=330)
    S = sc.score("cells", DOCS, sets=SETS)
    assert len(S.windows) > 1 and [1, 2, 3] in S.windows and S.sets.shape == (2, 3)
    with pytest.raises(RouteheadError, match="max_chunks_per_doc"):
        HeadScorer(lm, max_doc_tokens=50, max_chunks_per_doc=3, max_prompt_tokens=200).score("cells", DOCS)


def test_evidence_reads_the_best_chunk(lm):
    """A chunked document's evidence words are those of the chunk its score comes from."""
    sc = HeadScorer(lm, max_doc_tokens=50, max_chunks_per_doc=3)
    S = sc.score("cells", DOCS, sets=SETS, keep_tokens=True, per_head=False)
    ev = document_evidence(lm.tokenizer, S, 0, 50)
    best = int(S.best_chunk[0, 1])
    chunk = sc.builder.chunk_documents(DOCS).texts[1 + best]
    assert len(ev) == 3 and {w["text"] for w in ev[1]} <= set(chunk.split())
    assert {w["text"] for w in ev[0]} <= set(DOCS[0].split())
