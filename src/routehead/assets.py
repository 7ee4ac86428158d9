"""Files shipped inside the package (static head sets, routers, score calibrations), found by model name.

Torch-free, so the CLI, the service's settings and the data tools can name an asset without loading a model.
"""

from __future__ import annotations

import importlib.resources
from pathlib import Path

# routers that may ship beside the default one; pass router="<variant>"
ROUTER_VARIANTS = ("bce", "fs", "fast", "multi", "heads", "input")


def asset(name: str) -> Path:
    """A file shipped inside the package."""
    return Path(str(importlib.resources.files("routehead").joinpath("assets", name)))


def default_router_path(model_name: str) -> Path:
    return asset(f"router-{model_name}.safetensors")


def router_path(model_name: str, router: str | Path | None) -> tuple[Path, bool]:
    """The router file a caller means, and whether it is a shipped asset: ``None`` is the default router, a
    variant name the one shipped under it, anything else a path. Variants: ``"bce"``, the paper's recipe;
    ``"fs"``, may route the first-stage score; ``"fast"``, a priced, shallower router, shipped only where one meets
    bench/train_router.py's rule (none today); ``"multi"``, the first-stage router's recipe trained on scifact
    train and five other collections' test queries by bench/loco.py, SmolLM2 only: never evaluate it on those
    five (fitted on shuffled lists); ``"heads"``, each model's first default, which reads the query alone and routes
    heads only (fitted on shuffled scifact train lists); ``"input"``, SmolLM2's second default, which reads the
    query inside the re-ranking prompt, fitted on shuffled scifact train lists and served in BM25 order.
    SmolLM2's default reads the query inside the re-ranking prompt too (so it routes inside that pass), routes the
    first-stage score, was fitted on reversed lists of scifact train and the five other collections' test queries
    with a pool of layers <= 19 (every routed pass runs at most 20 of the 30 layers) and is served reversed.
    Gemma's default reads the query alone (a short pass, layer 15), routes the first-stage score and was fitted on
    reversed lists of the same collections; both start their training from the greedy set best on the training
    queries. Never report a default router's figures on the collections it was fitted on."""
    if router is None:
        return default_router_path(model_name), True
    if isinstance(router, str) and router in ROUTER_VARIANTS and not Path(router).exists():
        return asset(f"router-{model_name}-{router}.safetensors"), True
    return Path(router), False


def default_heads_path(model_name: str) -> Path:
    return asset(f"heads-{model_name}.json")


def default_core_heads_path(model_name: str) -> Path:
    """The CoRe head set shipped for a model (``routehead detect --rule core``)."""
    return asset(f"heads-{model_name}-core.json")


def default_window_path(model_name: str) -> Path:
    """The Selective-ICR layer window shipped for a model (``routehead detect --rule layers``)."""
    return asset(f"layers-{model_name}.json")
