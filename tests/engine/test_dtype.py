"""Compute dtypes: bfloat16 passes rank documents as float32 passes do; ``auto`` and the CPU's bf16 support."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from routehead.engine.aggregate import HeadSet
from routehead.engine.model import cpu_flags, cpu_native_bf16, resolve_dtype, wrap_model
from routehead.engine.scorer import HeadScorer
from routehead.metrics import rank_order
from routehead.testing.tiny import byte_tokenizer, tiny_model

QUERY = "which enzyme breaks down starch?"
DOCS = [
    "Amylase is an enzyme that catalyses the hydrolysis of starch into sugars.",
    "The Eiffel Tower is a wrought-iron lattice tower in Paris.",
    "Lipase breaks down fats; protease breaks down proteins.",
    "Starch is a polymeric carbohydrate made of glucose units.",
    "Photosynthesis converts light into chemical energy.",
    "Glucose is a simple sugar with formula C6H12O6.",
    "The mitochondria is the powerhouse of the cell.",
    "Enzymes are proteins that speed up reactions.",
]


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3", "mistral"])
def test_bfloat16_scores_rank_as_float32_scores(family):
    """Same weights, matmuls in bfloat16: the all-head (ICR) ranking is identical and every head's own ranking
    nearly so (the rows that become scores are float32 in both)."""
    got = []
    for dt in (torch.float32, torch.bfloat16):
        lm = wrap_model(tiny_model(family).to(dt), byte_tokenizer(True), name=f"tiny-{family}")
        r = HeadScorer(lm, max_doc_tokens=None).score(QUERY, DOCS, sets=[HeadSet.of(None)])
        assert r.sets.dtype == torch.float32
        got.append((r.sets[0].numpy(), r.calibrated.numpy()))
    (a, ca), (b, cb) = got
    assert list(rank_order(a)) == list(rank_order(b))
    rhos = [spearmanr(ca[i, j], cb[i, j])[0] for i in range(ca.shape[0]) for j in range(ca.shape[1])
            if np.ptp(ca[i, j]) > 0]
    assert np.nanmean(rhos) > 0.98


def test_native_bf16_is_read_from_the_cpu_flags(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse avx2 avx512f avx512_bf16\n")
    assert cpu_flags(info) >= {"avx2", "avx512_bf16"}
    assert cpu_native_bf16(cpu_flags(info))
    assert not cpu_native_bf16({"avx", "avx2", "fma"})
    assert cpu_native_bf16({"fp", "asimd", "bf16"})  # Arm's Features line
    assert cpu_flags(tmp_path / "missing") == set()


def test_auto_is_exact_on_cpu_and_bfloat16_on_cuda():
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype(None, torch.device("cuda")) == torch.bfloat16
    assert resolve_dtype("bf16", torch.device("cpu")) == torch.bfloat16
