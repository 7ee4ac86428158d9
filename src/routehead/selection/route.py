"""RouteHead (SIGIR 2026): a router maps each query, embedded from the frozen LLM's hidden states, to its own
heads; only those are aggregated, so the pass stops after the deepest routed layer."""

from __future__ import annotations

from typing import Any

import torch

from routehead.assets import router_path
from routehead.engine.aggregate import Head, HeadSet
from routehead.engine.scorer import PassRouting
from routehead.errors import RouteheadError
from routehead.selection.base import Asset, Method, Selection
from routehead.selection.router import Router, Routing, load_router


class Route(Method):
    """Per-query heads from a router (RouteHead)."""

    def __init__(self, router: Router) -> None:
        super().__init__(router.config.prompt)
        self.router = router
        self._fingerprint: str | None = None

    @classmethod
    def load(cls, identity: dict[str, Any], asset: Asset = None) -> Route:
        """``asset``: a router file, a shipped variant name (:data:`routehead.assets.ROUTER_VARIANTS`), or None for the
        default router shipped for the model."""
        if asset is not None and not isinstance(asset, str) and not hasattr(asset, "__fspath__"):
            raise RouteheadError("method 'route' takes a router (a path or a shipped variant name), not a head list")
        path, shipped = router_path(identity["model"], asset)
        if shipped and not path.is_file():
            which = "router" if asset is None else f"{asset!r} router"
            raise RouteheadError(f"no {which} shipped for model {identity['model']!r}; train one (routehead train) "
                                 f"and pass router=PATH, or use method='static' or 'icr'")
        return cls(load_router(path, identity))

    @property
    def serving_order(self) -> str | None:  # type: ignore[override]
        """The order the router file says it is served in (chosen on held-out train queries), or None."""
        return self.router.config.serving_order

    @property
    def embedding(self) -> tuple[int, str]:
        return self.router.config.embed_layer, self.router.config.pooling

    def routing(self, embedding: torch.Tensor) -> Routing:
        return self.router.route(embedding)

    def select(self, embedding: torch.Tensor | None = None) -> Selection:
        if embedding is None:
            raise RouteheadError("method 'route' needs the query's embedding")
        return selection_of(self.routing(embedding), self.router.config.pool_heads)

    def pass_routing(self) -> PassRouting | None:
        """A router that reads the query in the re-ranking prompt (``prompt-*`` pooling) routes inside that pass:
        no second pass, and the pass still stops after the deepest routed layer."""
        cfg = self.router.config
        if not cfg.pooling.startswith("prompt-"):
            return None
        return PassRouting(cfg.embed_layer, cfg.pooling, tuple(sorted(cfg.pool_heads)), self.select)

    def info(self) -> dict[str, Any]:
        cfg = self.router.config
        if self._fingerprint is None:  # the router is not trained further once it selects
            self._fingerprint = self.router.fingerprint()
        return {"router": {"embed_layer": cfg.embed_layer, "threshold": cfg.threshold, "max_heads": cfg.max_heads,
                           "pool": len(cfg.pool), "fingerprint": self._fingerprint}}


def selection_of(r: Routing, pool: list[Head]) -> Selection:
    """A routing as a selection, its heads in routed (signal) order, each with its aggregation weight."""
    heads = [(pool[i], float(w)) for i, w in zip(r.signals, r.signal_weights) if i < len(pool)]
    return Selection(HeadSet.of([h for h, _ in heads], [w for _, w in heads]), r.first_stage_weight)
