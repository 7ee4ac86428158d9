"""The RouteHead router: maps a query to its own set of attention heads.

The query is embedded from the frozen LLM's hidden states (a short pass over the query alone, so routing
happens before the long re-ranking pass); every head has a learnable embedding and a bias; the router's
logit for (query, head) is ``<proj(query), head_embedding> + bias``. The biases start at the heads' prior
(how often each head is in a training query's pseudo label), so an untrained or unsure router falls back to
the globally strong heads, and training learns when a query should leave them.

Selection: heads with probability >= ``threshold``, best first, at most ``max_heads``; when none passes, the
single most probable head (so at least one head is always routed). Only the heads of ``pool`` (the routable
pool, e.g. the best 64 by detection on the training split) can be routed. The selected heads' token scores
are aggregated as every method's are (summed, then the outlier mask, then summed over each document):
plainly (``weighting="none"``, the paper's rule, for routers trained on pseudo labels), or weighted by their
routed probability (``weighting="prob"``, for routers trained through the ranking, whose training objective
is exactly that weighted aggregation).

Checkpoints are one ``.safetensors`` file: the weights, and the JSON config (model identity, embedding layer
and pooling, selection rule, training settings) in the file's metadata. No pickle.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from routehead.engine.aggregate import Head
from routehead.errors import RouteheadError
from routehead.selection.heads import check_identity
from routehead.settings import FIT

FORMAT = "routehead-router-v2"


@dataclass
class RouterConfig:
    """Everything needed to use a router again, and to refuse it for the wrong model."""

    identity: dict[str, Any]  # LoadedModel.identity() of the LLM it routes
    embed_layer: int  # decoder layer whose output embeds the query
    pool: list[list[int]]  # the routable heads, [layer, head]; signal i < len(pool) is pool[i]
    pooling: str = FIT.pooling
    dim: int = FIT.dim
    threshold: float = 0.5
    max_heads: int = FIT.route_max
    use_first_stage: bool = False  # the first-stage score is one more routable signal (index len(pool))
    weighting: str = "none"  # "none": selected signals summed; "prob": weighted by routed probability
    serving_order: str | None = None  # the prompt order it is served in, chosen on held-out train (None: default)
    prompt: dict[str, Any] = field(default_factory=dict)  # prompt settings the router was trained with
    training: dict[str, Any] = field(default_factory=dict)

    @property
    def num_layers(self) -> int:
        return int(self.identity["num_layers"])

    @property
    def num_heads(self) -> int:
        return int(self.identity["num_heads"])

    @property
    def pool_heads(self) -> list[Head]:
        return [(int(a), int(b)) for a, b in self.pool]

    @property
    def num_signals(self) -> int:
        return len(self.pool) + int(self.use_first_stage)

    @property
    def hidden_size(self) -> int:
        return int(self.identity["hidden_size"])

    @property
    def trained_on(self) -> list[str]:
        """The collection splits (``<collection>/<split>``) whose judged queries trained this router, as its
        fitting recorded them: its figures on those are training figures, never test ones. Empty when unknown."""
        t = self.training
        if "members" in t:
            return [str(m) for m in t["members"]]
        return [f"{t['collection']}/{t['split']}"] if "collection" in t and "split" in t else []


@dataclass
class Routing:
    """Which heads one query is routed to, each head's aggregation weight, and the first-stage score's weight
    (0 when the first stage is not routed)."""

    heads: list[Head]
    weights: list[float]
    first_stage_weight: float
    signals: list[int]  # the same selection as signal indices (into the pool; len(pool): the first stage)
    signal_weights: np.ndarray  # their weights, aligned with ``signals``
    probabilities: torch.Tensor  # [signals], for inspection


class Router(nn.Module):
    """Bilinear scorer of (query embedding, head embedding) pairs, plus a per-head prior bias."""

    def __init__(self, config: RouterConfig, prior: np.ndarray | None = None) -> None:
        super().__init__()
        self.config = config
        n, d = config.num_signals, config.dim
        self.norm = nn.LayerNorm(config.hidden_size)
        self.proj = nn.Linear(config.hidden_size, d)
        gen = torch.Generator().manual_seed(0)
        self.head_emb = nn.Parameter(torch.randn(n, d, generator=gen) * 0.02)
        bias = torch.full((n,), -4.0)
        if prior is not None:
            p = torch.as_tensor(prior, dtype=torch.float32).clamp(1e-3, 1 - 1e-3)
            bias = torch.log(p / (1 - p))
        self.bias = nn.Parameter(bias)

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        """Logits ``[batch, signals]`` for query embeddings ``[batch, hidden]``."""
        q = self.proj(self.norm(emb.float()))
        return q @ self.head_emb.T / math.sqrt(self.config.dim) + self.bias

    @torch.no_grad()
    def probabilities(self, emb: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.forward(emb.reshape(-1, self.config.hidden_size)))

    def select(self, probs: torch.Tensor | np.ndarray, threshold: float | None = None,
               max_heads: int | None = None) -> list[int]:
        """Signal indices (into the pool; ``len(pool)`` is the first stage) routed for one query."""
        p = np.asarray(probs, dtype=np.float64).reshape(-1)
        t = self.config.threshold if threshold is None else threshold
        m = self.config.max_heads if max_heads is None else max_heads
        order = np.argsort(-p, kind="stable")
        chosen = [int(i) for i in order[:m] if p[i] >= t]
        return chosen or [int(order[0])]

    def weights(self, probs: torch.Tensor | np.ndarray, signals: list[int]) -> np.ndarray:
        """Aggregation weights of the selected signals (all ones unless ``weighting="prob"``)."""
        if self.config.weighting == "none":
            return np.ones(len(signals))
        if self.config.weighting == "prob":
            return np.asarray(probs, dtype=np.float64).reshape(-1)[signals]
        raise RouteheadError(f"unknown router weighting {self.config.weighting!r}")

    def route(self, emb: torch.Tensor) -> Routing:
        """The routing decision for one query embedding: heads, their weights, the first-stage weight."""
        return self.route_probs(self.probabilities(emb)[0])

    def route_probs(self, probs: torch.Tensor, threshold: float | None = None) -> Routing:
        """:meth:`route` from the routing probabilities ``[signals]`` (threshold: override, for tuning)."""
        sel = self.select(probs, threshold)
        P, pool = len(self.config.pool), self.config.pool_heads
        if all(i == P for i in sel):  # only the first stage was routed: keep the most probable head too
            sel = sel + [int(torch.argmax(torch.as_tensor(probs)[:P]))]
        w = self.weights(probs, sel)
        pairs = sorted((pool[i], float(x)) for i, x in zip(sel, w) if i < P)
        fs = next((float(x) for i, x in zip(sel, w) if i == P), 0.0)
        return Routing(heads=[h for h, _ in pairs], weights=[x for _, x in pairs], first_stage_weight=fs,
                       signals=sel, signal_weights=w, probabilities=probs)

    def fingerprint(self) -> str:
        """A short digest of the routing decisions' inputs (weights, pool, threshold, cap, weighting): what a
        calibration fitted on this router's scores is keyed by, so it never applies to another router's."""
        h = hashlib.sha256()
        cfg = self.config
        h.update(json.dumps([cfg.embed_layer, cfg.pooling, cfg.pool, cfg.threshold, cfg.max_heads,
                             cfg.use_first_stage, cfg.weighting]).encode())
        for name, tensor in sorted(self.state_dict().items()):
            h.update(name.encode())
            h.update(tensor.detach().cpu().float().contiguous().numpy().tobytes())
        return h.hexdigest()[:12]

    def save(self, path: str | Path) -> None:
        from safetensors.torch import save_file

        meta = {"format": FORMAT, "config": json.dumps(asdict(self.config))}
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(path), metadata=meta)


def merge_routers(routers: list[Router]) -> Router:
    """One router whose logits are the mean of the members' logits (an exact merge, not an approximation).

    Each member's logit is linear in the normalised query ``n(e)``: ``(W diag(g) n + W b + c) . h / sqrt(d) + bias``
    (g, b: its LayerNorm affine; W, c: its projection; h: head embeddings). Stacking the members' projections
    and head embeddings (scaled by 1/sqrt(K)) gives a router of dimension K*d with the averaged logits, so an
    ensemble of K cross-validated routers is saved and run like a single one.
    """
    first = routers[0].config
    K, d = len(routers), first.dim
    cfg = RouterConfig(**{**asdict(first), "dim": K * d})
    merged = Router(cfg)
    with torch.no_grad():
        merged.norm.weight.fill_(1.0)
        merged.norm.bias.zero_()
        W = [r.proj.weight * r.norm.weight[None] for r in routers]
        c = [r.proj.weight @ r.norm.bias + r.proj.bias for r in routers]
        merged.proj.weight.copy_(torch.cat(W))
        merged.proj.bias.copy_(torch.cat(c))
        merged.head_emb.copy_(torch.cat([r.head_emb for r in routers], 1) / math.sqrt(K))
        merged.bias.copy_(torch.stack([r.bias for r in routers]).mean(0))
    return merged.eval()


def load_router(path: str | Path, identity: dict[str, Any] | None = None) -> Router:
    """Load a router checkpoint; with ``identity``, refuse a router trained for another model."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    p = Path(path)
    if not p.is_file():
        raise RouteheadError(f"router file not found: {p}")
    try:
        with safe_open(str(p), framework="pt") as f:
            meta = f.metadata() or {}
        if meta.get("format") == "routehead-router-v1":
            raise RouteheadError(f"router {p} was trained by an older routehead (per-head masking, another prompt); "
                                 f"its heads do not carry over: train it again (routehead train)")
        if meta.get("format") != FORMAT:
            raise ValueError(f"format is {meta.get('format')!r}, expected {FORMAT!r}")
        config = RouterConfig(**json.loads(meta["config"]))
        state = load_file(str(p))
    except RouteheadError:
        raise
    except Exception as exc:
        raise RouteheadError(f"{p} is not a valid routehead router ({type(exc).__name__}: {exc})") from exc
    if identity is not None:
        check_identity(config.identity, identity, f"router {p}")
    router = Router(config)
    try:
        router.load_state_dict(state)
    except RuntimeError as exc:
        raise RouteheadError(f"router {p} has weights that do not fit its config: {exc}") from exc
    return router.eval()
