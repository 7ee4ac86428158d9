"""The RouteHead router: maps a query to its own set of attention heads.

The query is embedded from the frozen LLM's hidden states (a short pass over the query alone, so routing
happens before the long re-ranking pass); every head has a learnable embedding and a bias; the router's
logit for (query, head) is ``<proj(query), head_embedding> + bias``. The biases start at the heads' prior
(how often each head is in a training query's pseudo label), so an untrained or unsure router falls back to
the globally strong heads, and training learns when a query should leave them.

Selection: heads with probability >= ``threshold``, best first, at most ``max_heads``; when none passes, the
single most probable head (so at least one head is always routed). The selected heads are aggregated exactly
as in label search (:func:`routehead.heads.aggregate` with the router's ``norm``).

Checkpoints are one ``.safetensors`` file: the weights, and the JSON config (model identity, embedding layer
and pooling, selection rule, training settings) in the file's metadata. No pickle.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from routehead.errors import RouteheadError
from routehead.heads import Head, check_identity

FORMAT = "routehead-router-v1"


@dataclass
class RouterConfig:
    """Everything needed to use a router again, and to refuse it for the wrong model."""

    identity: dict[str, Any]  # LoadedModel.identity() of the LLM it routes
    embed_layer: int  # decoder layer whose output embeds the query
    pooling: str = "mean"
    dim: int = 64
    threshold: float = 0.5
    max_heads: int = 8
    norm: str = "z"  # aggregation of the selected heads (same as in label search)
    use_first_stage: bool = False  # the first-stage score is one more routable signal (index L*H)
    max_doc_tokens: int | None = 160  # prompt setting the router was trained with
    training: dict[str, Any] = field(default_factory=dict)

    @property
    def num_layers(self) -> int:
        return int(self.identity["num_layers"])

    @property
    def num_heads(self) -> int:
        return int(self.identity["num_heads"])

    @property
    def num_signals(self) -> int:
        return self.num_layers * self.num_heads + int(self.use_first_stage)

    @property
    def hidden_size(self) -> int:
        return int(self.identity["hidden_size"])


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
        """Signal indices (flat ``layer * H + head``; ``L * H`` is the first stage) routed for one query."""
        p = np.asarray(probs, dtype=np.float64).reshape(-1)
        t = self.config.threshold if threshold is None else threshold
        m = self.config.max_heads if max_heads is None else max_heads
        order = np.argsort(-p, kind="stable")
        chosen = [int(i) for i in order[:m] if p[i] >= t]
        return chosen or [int(order[0])]

    def heads_of(self, signals: list[int]) -> tuple[list[Head], bool]:
        """Split selected signal indices into (layer, head) pairs and the first-stage flag."""
        H, LH = self.config.num_heads, self.config.num_layers * self.config.num_heads
        heads = sorted((i // H, i % H) for i in signals if i < LH)
        return heads, any(i == LH for i in signals)

    def save(self, path: str | Path) -> None:
        from safetensors.torch import save_file

        meta = {"format": FORMAT, "config": json.dumps(asdict(self.config))}
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(path), metadata=meta)


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
