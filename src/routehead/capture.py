"""Attention capture through transformers' attention-function registry, and early exit after a layer.

The registered function returns exactly what SDPA returns (so the model's outputs are unchanged) and, when
a :class:`Recorder` is active, computes ``softmax(q K^T * scale + mask)`` for the query-span rows of the
requested heads only, averaged over the query tokens: an ``[heads, keys]`` row per layer, never ``T x T``.
The mask is the one the model passes to attention (causal, padding, sliding window), produced by the same
mask function SDPA uses: a custom attention name must register its mask function too, or transformers falls
back to a mask that is wrong once a KV cache is in play.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from typing import Any

import torch

ATTN_NAME = "routehead_capture"

_RECORDER: contextvars.ContextVar[Recorder | None] = contextvars.ContextVar("routehead_recorder", default=None)
_registered = False


class Recorder:
    """Collects query-span attention rows for chosen heads, keyed by layer.

    ``heads_by_layer`` maps a layer index to the head indices to record in it; ``span`` is the [start, end) of
    the query tokens in the current call's query positions; ``total_len`` is the absolute key length (rows of
    sliding-window layers, whose cache holds only the last keys, are right-aligned into it).
    """

    def __init__(self, heads_by_layer: dict[int, list[int]], span: tuple[int, int], total_len: int) -> None:
        self.heads = {layer: torch.as_tensor(h, dtype=torch.long) for layer, h in heads_by_layer.items()}
        self.span = span
        self.total_len = total_len
        self.rows: dict[int, torch.Tensor] = {}

    def record(self, module: Any, query: torch.Tensor, key: torch.Tensor, attention_mask: torch.Tensor | None,
               scaling: float | None, softcap: float | None) -> None:
        layer = getattr(module, "layer_idx", None)
        if layer not in self.heads:
            return
        heads = self.heads[layer].to(query.device)
        s, e = self.span
        n_rep = query.shape[1] // key.shape[1]
        q = query[:, heads, s:e].float()  # [B, h, Q, D]
        k = key[:, heads // n_rep].float()  # [B, h, K, D]: grouped KV heads shared by n_rep query heads
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        logits = torch.matmul(q, k.transpose(-1, -2)) * scale
        if softcap is not None:
            logits = torch.tanh(logits / softcap) * softcap
        n_q, n_k = query.shape[2], key.shape[2]
        if attention_mask is None:
            # No mask means SDPA's is_causal path (q_len == kv_len, or a single query token): causal, bottom-right.
            qpos = torch.arange(s, e, device=q.device)[:, None] + (n_k - n_q)
            allowed = torch.arange(n_k, device=q.device)[None, :] <= qpos
            logits = logits.masked_fill(~allowed, float("-inf"))
        else:
            m = attention_mask[:, :, s:e, :]
            if m.shape[1] > 1:
                m = m[:, heads]
            logits = logits.masked_fill(~m, float("-inf")) if m.dtype == torch.bool else logits + m.float()
        probs = torch.softmax(logits, dim=-1).mean(dim=-2)  # [B, h, K]
        if n_k < self.total_len:
            probs = torch.nn.functional.pad(probs, (self.total_len - n_k, 0))
        self.rows[layer] = probs


def _capture_attention(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                       is_causal: bool | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    rec = _RECORDER.get()
    if rec is not None:
        rec.record(module, query, key, attention_mask, scaling, kwargs.get("softcap"))
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  is_causal=is_causal, **kwargs)


def register() -> str:
    """Register the capture function and its mask function (SDPA's) under :data:`ATTN_NAME`."""
    global _registered
    if not _registered:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

        AttentionInterface.register(ATTN_NAME, _capture_attention)
        AttentionMaskInterface.register(ATTN_NAME, sdpa_mask)
        _registered = True
    return ATTN_NAME


def install(model: Any) -> None:
    """Switch a loaded model to the capturing attention (outputs stay SDPA's)."""
    register()
    try:
        model.set_attn_implementation(ATTN_NAME)
    except Exception:  # older transformers: set the config field directly, on every sub-config
        for cfg in {id(c): c for c in [model.config, getattr(model.config, "text_config", None)] if c}.values():
            cfg._attn_implementation = ATTN_NAME


@contextlib.contextmanager
def recording(recorder: Recorder | None) -> Iterator[Recorder | None]:
    token = _RECORDER.set(recorder)
    try:
        yield recorder
    finally:
        _RECORDER.reset(token)


class StopForward(Exception):
    """Raised after the deepest needed layer: later layers do no work at all."""


def decoder_layers(model: Any) -> torch.nn.ModuleList:
    """The model's list of decoder layers, found by shape rather than by per-family attribute names."""
    from routehead.model import text_config

    n = int(text_config(model.config).num_hidden_layers)
    base = model.get_decoder() if hasattr(model, "get_decoder") else model
    for mod in base.modules():
        if isinstance(mod, torch.nn.ModuleList) and len(mod) == n:
            return mod
    raise RuntimeError(f"could not find the {n} decoder layers of {type(model).__name__}")


@contextlib.contextmanager
def exit_after(layers: torch.nn.ModuleList, last: int, keep_output: bool = False) -> Iterator[dict]:
    """Stop the forward pass right after decoder layer ``last``; optionally keep that layer's output."""
    box: dict[str, torch.Tensor] = {}

    def hook(_module: Any, _args: Any, output: Any) -> None:
        if keep_output:
            box["hidden"] = output[0] if isinstance(output, tuple) else output
        raise StopForward

    handle = layers[last].register_forward_hook(hook)
    try:
        yield box
    except StopForward:
        pass
    finally:
        handle.remove()
