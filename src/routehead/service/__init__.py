"""routehead's production re-rank service (Cohere v1/v2, Jina, TEI shapes; batching; backpressure; metrics).

Modules: ``app`` (wiring), ``handlers`` (status endpoints, errors, lifespan), ``reranking`` (the re-rank
endpoints), ``parsing`` (request bodies), ``state`` (replicas, readiness), ``protocol`` (``RerankerLike``: what
is asked of a reranker), ``shapes`` (request bodies, results), ``responses`` (response bodies), ``schema`` (the
request bodies in /openapi.json, with the limits), ``batching`` (queue, replica workers, drain), ``load`` (measured
tokens/s and the wait it gives: cost-based admission), ``tokens`` (``max_tokens_per_doc``), ``metrics``
(Prometheus), ``http`` (body/header timeouts), ``errors`` (the error shapes), ``config`` (limits and settings:
every default), ``docs`` (offline /docs), ``run`` (uvicorn, SIGTERM drain, logs).

The names below load on first use, so ``routehead.service.config`` (what ``routehead serve`` builds its options
from) and ``routehead.service.protocol`` import without FastAPI.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from routehead.service.app import create_app
    from routehead.service.config import Limits, ServiceSettings
    from routehead.service.protocol import RerankerLike
    from routehead.service.run import serve

_HOMES = {"create_app": "app", "Limits": "config", "ServiceSettings": "config", "RerankerLike": "protocol",
          "serve": "run"}

__all__ = ["Limits", "RerankerLike", "ServiceSettings", "create_app", "serve"]


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_HOMES[name]}"), name)
