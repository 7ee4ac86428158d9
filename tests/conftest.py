"""Fixtures shared across the stage folders; each folder's conftest.py holds the ones only its tests use."""

import os

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def default_lm():
    """The real embedded default model (SmolLM2-135M-Instruct), loaded once per test session."""
    from routehead.engine.model import load_model

    return load_model()


@pytest.fixture(scope="module")
def tiny_router_reranker(tmp_path_factory):
    """A Reranker with method "route" on tiny_lm("llama"): an untrained router over every head (no first stage),
    threshold 0, at most 3 heads. Used by the routed-inference (selection) and Reranker (api) tests."""
    from routehead.api import Reranker
    from routehead.selection.router import Router, RouterConfig
    from routehead.testing.tiny import tiny_lm
    from tests.toys import toy_pool

    lm = tiny_lm("llama")
    cfg = RouterConfig(identity=lm.identity(), embed_layer=1, pool=toy_pool(lm.num_layers, lm.num_heads),
                       threshold=0.0, max_heads=3, prompt={"max_doc_tokens": None})
    path = tmp_path_factory.mktemp("r") / "router.safetensors"
    Router(cfg, prior=np.linspace(0.1, 0.9, lm.num_layers * lm.num_heads)).save(path)
    return Reranker(model=lm, method="route", router=path)


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module (``pytestmark = pytest.mark.usefixtures("one_thread")``): the many small ops of
    router fitting slow down by an order of magnitude when their threads share the CPU with other work."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
