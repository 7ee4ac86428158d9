"""The FLOP count bench/speed.py divides by, against a count by hand from the tiny models' configs."""

from __future__ import annotations

from routehead.testing.measure import pass_flops
from routehead.testing.tiny import tiny_lm


def test_pass_flops_by_hand():
    # tiny Llama: hidden 64, MLP 96, 4 heads of 16, 2 KV heads, 4 causal layers
    T = 10
    per_layer = 64 * 64 * 2 + 64 * 32 * 2 + 3 * 64 * 96  # q, o; k, v; gate, up, down
    got = pass_flops(tiny_lm("llama"), T)
    assert got["linear"] == 2 * T * 4 * per_layer
    assert got["attention"] == 4 * 4 * (4 * 16 * T * (T + 1) / 2)
    # tiny Gemma-3: 5 sliding layers (window 16) and 1 causal, 40 tokens
    T = 40
    got = pass_flops(tiny_lm("gemma3"), T)
    sliding, causal = 16 * 17 / 2 + (T - 16) * 16, T * (T + 1) / 2
    assert got["attention"] == 4 * 16 * 4 * (5 * sliding + causal)
    assert got["total"] == got["linear"] + got["attention"]
