"""Cases for tests/engine/test_span_kernel.py, run in a child process under Triton's CPU interpreter.

``TRITON_INTERPRET=1`` must be set before Triton compiles anything, so these run in their own process and print
one JSON object: for each case, the largest difference between the fused kernels and the reference it is held to.
"""

from __future__ import annotations

import json
import os
import sys

assert os.environ.get("TRITON_INTERPRET") == "1", "run under TRITON_INTERPRET=1"

import torch  # noqa: E402

from routehead.engine import capture, span_kernel  # noqa: E402
from routehead.engine.scorer import HeadScorer  # noqa: E402
from routehead.testing.tiny import eager_twin, tiny_lm  # noqa: E402
from tests.engine.test_engine import DOCS, QUERY, eager_rows  # noqa: E402


def _diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


def tensors() -> dict[str, float]:
    """Both branches on random tensors: grouped-query heads, two prompts of different lengths in one batch,
    spans longer than one block of rows, a head range, with and without a sliding window."""
    torch.manual_seed(0)
    B, H, Hkv, D, n = 2, 4, 2, 16, 70
    split = capture.Split((300, 211), (380, 250))
    W = split.width
    q, k, v = torch.randn(B, H, W + n, D), torch.randn(B, Hkv, W + n, D), torch.randn(B, Hkv, W + n, D)
    lay = split.tensors(q.device)
    out = {}
    for window in (None, 48):
        with capture.kernel("torch"):
            o_t, r_t = capture._na_attention(q, k, v, split, lay, window, 0.3, None)
            q_t = capture._query_rows(q, k, [0, 1, 2, 3], lay, split, 0.3, None, window)
        with capture.kernel("triton"):
            o_f, r_f = capture._na_attention(q, k, v, split, lay, window, 0.3, None)
            q_f = capture._query_rows(q, k, [2, 3], lay, split, 0.3, None, window)
        out[f"window={window}"] = max(_diff(o_t, o_f), _diff(r_t, r_f), _diff(q_t[:, 2:], q_f))
    return out


def models() -> dict[str, float]:
    """Real architectures end to end: span rows equal eager attention; the per-token scores of prompts sharing a
    batch equal the torch path's."""
    calls = []
    real = span_kernel.span_rows
    span_kernel.span_rows = lambda *a, **kw: calls.append(1) or real(*a, **kw)
    out = {}
    for family in ("llama", "gemma3"):
        lm = tiny_lm(family)
        scorer = HeadScorer(lm, max_doc_tokens=None, instruction="Rank:")  # a short span: the interpreter is slow
        ref = eager_twin(lm, family)
        prompt = scorer.builder.prompt(QUERY, DOCS)
        heads = [(lay, h) for lay in range(lm.num_layers) for h in range(lm.num_heads)]
        items = [(QUERY, DOCS), ("starch?", DOCS[1:3])]
        with capture.kernel("torch"):
            toks_t = [s.tokens.rows for s in scorer.score_many(items, batch_size=2, keep_tokens=True)]
        with capture.kernel("triton"):
            q_f, na_f = scorer.query_rows(prompt, heads, single_pass=True)
            toks_f = [s.tokens.rows for s in scorer.score_many(items, batch_size=2, keep_tokens=True)]
        out[f"{family} rows vs eager"] = max(_diff(q_f, eager_rows(ref, prompt, prompt.query_ids)),
                                             _diff(na_f, eager_rows(ref, prompt, prompt.na_ids)))
        out[f"{family} batched tokens vs torch"] = max(_diff(a, b) for a, b in zip(toks_t, toks_f))
    out["kernel calls"] = len(calls)
    return out


if __name__ == "__main__":
    json.dump({**tensors(), **models()}, sys.stdout)
