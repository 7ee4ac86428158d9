"""Evidence: which words of a document carried its score (the kept tokens' calibrated scores, by word)."""

from __future__ import annotations

from typing import Any

import torch

from routehead.engine.aggregate import kept, spans_of
from routehead.engine.scorer import HeadScores


def document_evidence(tokenizer: Any, S: HeadScores, set_index: int, k: int) -> list[list[dict[str, Any]]]:
    """Per document (prompt order): the ``k`` words that carried most of its score, each with its share.

    A word's score is the sum of its tokens' kept (above the outlier threshold) calibrated scores under the
    selected heads, the same numbers the document's score sums; share = word score / the positive score of all
    the document's words (the ``[i]`` marker is not a word of the document and is left out). A chunked document's
    words are those of its best chunk under the set: the chunk its score is (:func:`routehead.engine.scorer.maxp`).
    """
    assert S.set_tokens is not None
    rows = S.set_tokens.rows[set_index]
    spans = spans_of(S.set_tokens.counts)
    passage = S.chunk_starts()
    if S.best_chunk is not None:
        passage = [p + int(c) for p, c in zip(passage, S.best_chunk[set_index].tolist())]
    out = []
    for d in passage:
        ids = S.token_ids[d]
        s, e = int(spans.idx[d, 0]), int(spans.idx[d, 0]) + len(ids)
        x = rows[s:e]
        mass = (x * kept(x[None], torch.ones(1, len(ids), dtype=torch.bool))[0]).double()
        words: list[list[Any]] = []
        for tid, val in zip(ids, mass.tolist()):
            piece = tokenizer.decode([tid])
            if not words or piece[:1].isspace() or not piece.strip() or not words[-1][0].strip():
                words.append([piece, val])
            else:
                words[-1][0] += piece
                words[-1][1] += val
        words = [w for w in words if w[0].strip() and not w[0].strip().startswith("[")]
        total = sum(w[1] for w in words if w[1] > 0) or 1.0  # the positive mass the words carry
        top = sorted(words, key=lambda w: -w[1])[:k]
        out.append([{"text": w[0].strip(), "share": round(w[1] / total, 4)} for w in top])
    return out
