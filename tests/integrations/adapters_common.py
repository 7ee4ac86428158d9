"""Shared bits of the adapter tests: a tiny random model with a router that routes the first-stage score too,
so a test can see the retriever's scores reach ``first_stage_scores`` through each framework."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from routehead.testing.tiny import tiny_lm

QUERY = "which enzyme digests starch?"
DOCS = ["Amylase digests starch into sugar.", "Paris is in France.", "Lipase digests fat.",
        "Starch is made of glucose.", "The sky is blue."]
FIRST_STAGE = [3.0, 0.5, 2.0, 2.5, 0.1]


def tiny_router(path: Path, lm=None) -> Path:
    """A router for tiny_lm("llama") that always routes the first-stage score plus a few heads."""
    from routehead.selection.router import Router, RouterConfig

    lm = lm or tiny_lm("llama")
    n = lm.num_layers * lm.num_heads
    pool = [[layer, head] for layer in range(lm.num_layers) for head in range(lm.num_heads)]
    cfg = RouterConfig(identity=lm.identity(), embed_layer=1, pool=pool, threshold=0.0, max_heads=3,
                       use_first_stage=True, prompt={"max_doc_tokens": None})
    prior = np.concatenate([np.linspace(0.1, 0.8, n), [0.99]])  # the first stage is the likeliest signal
    Router(cfg, prior=prior).save(path)
    return path


def tiny_reranker(tmp_dir: Path, method: str = "route"):
    from routehead.api import Reranker

    lm = tiny_lm("llama")
    if method == "route":
        return Reranker(model=lm, method="route", router=tiny_router(Path(tmp_dir) / "router.safetensors", lm))
    if method == "static":
        return Reranker(model=lm, method="static", heads=[(0, 1), (2, 3)])
    return Reranker(model=lm, method=method)


def tiny_folder(path: Path) -> Path:
    """tiny_lm("llama") saved as a Hugging Face folder, for settings that must be a path (CLI, YAML)."""
    from routehead.testing import byte_tokenizer
    from routehead.testing.tiny import tiny_model

    if not (path / "config.json").exists():
        tiny_model("llama").save_pretrained(path)
        byte_tokenizer().save_pretrained(path)
    return path


def expected(rr, query=QUERY, docs=DOCS, fs=None):
    """The ranking a direct Reranker call gives: what every adapter must reproduce."""
    return rr.rerank(query, docs, first_stage_scores=fs)
