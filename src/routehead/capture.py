"""Attention capture through transformers' attention-function registry, and early exit after a layer.

The registered function returns exactly what SDPA returns (so the model's outputs are unchanged) and, when
a :class:`Recorder` is active, computes ``softmax(q K^T * scale + mask)`` for the query-span rows of the
requested heads only, averaged over the query tokens: an ``[heads, keys]`` row per layer, never ``T x T``.
The mask is the one the model passes to attention (causal, padding, sliding window), produced by the same
mask function SDPA uses: a custom attention name must register its mask function too.

Two suffixes in one pass (:class:`Split`): the sequence ``prefix + query + "N/A"`` runs once, with the "N/A"
tokens given the positions right after the prefix. Each layer then attends in two branches: prefix and
query causally (the plain pass), and "N/A" over the prefix and itself only, exactly as if it ran alone after
the prefix. No KV cache is kept, so memory is that of one plain pass over the prompt.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

ATTN_NAME = "routehead_capture"

_RECORDER: contextvars.ContextVar[Recorder | None] = contextvars.ContextVar("routehead_recorder", default=None)
_SPLIT: contextvars.ContextVar[Split | None] = contextvars.ContextVar("routehead_split", default=None)
_registered = False


class Recorder:
    """Collects query-span attention rows for chosen heads, keyed by layer.

    ``heads_by_layer`` maps a layer index to the head indices to record in it; ``span`` is the [start, end) of
    the query tokens among the call's query positions. A row covers every key of the call.
    """

    def __init__(self, heads_by_layer: dict[int, list[int]], span: tuple[int, int]) -> None:
        self.heads = {layer: [int(x) for x in h] for layer, h in heads_by_layer.items()}
        self.span = span
        self.rows: dict[int, torch.Tensor] = {}

    def record(self, module: Any, query: torch.Tensor, key: torch.Tensor, attention_mask: torch.Tensor | None,
               scaling: float | None, softcap: float | None) -> None:
        layer = getattr(module, "layer_idx", None)
        if layer in self.heads:
            self.rows[layer] = attention_rows(query, key, self.heads[layer], self.span, attention_mask, scaling,
                                              softcap)


def attention_rows(query: torch.Tensor, key: torch.Tensor, heads: list[int], span: tuple[int, int],
                   attention_mask: torch.Tensor | None, scaling: float | None, softcap: float | None,
                   window: int | None = None) -> torch.Tensor:
    """``[B, len(heads), keys]``: the attention of query rows ``span`` per head, averaged over those rows.

    ``attention_mask`` None means causal, bottom-right aligned, within ``window`` keys when given. One KV group
    at a time: float32 logits of that group's requested heads against its own keys, so no grouped-query K is
    ever repeated or copied whole.
    """
    s, e = span
    n_rep = query.shape[1] // key.shape[1]
    n_q, n_k = query.shape[2], key.shape[2]
    if attention_mask is None:
        qpos = torch.arange(s, e, device=query.device) + (n_k - n_q)
        mask = _allowed(qpos, torch.arange(n_k, device=query.device), window)
    else:
        mask = attention_mask[:, :, s:e, :]
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    rows = query.new_empty(query.shape[0], len(heads), n_k, dtype=torch.float32)
    for g in sorted({h // n_rep for h in heads}):
        pos = [i for i, h in enumerate(heads) if h // n_rep == g]
        hs = [heads[i] for i in pos]
        m = mask[:, hs] if mask.dim() == 4 and mask.shape[1] > 1 else mask
        probs = _softmax(_logits(query[:, hs, s:e], [key[:, g:g + 1]], scale, softcap), m)
        rows[:, pos] = probs.mean(dim=-2)
    return rows


def _logits(q: torch.Tensor, keys: list[torch.Tensor], scale: float, softcap: float | None) -> torch.Tensor:
    """float32 ``q K^T * scale`` (softcapped) of query rows ``[B, h, Q, D]`` over key blocks ``[B, 1, K_i, D]``."""
    q = q.float()
    out = torch.cat([torch.matmul(q, k.float().transpose(-1, -2)) for k in keys], dim=-1) * scale
    return torch.tanh(out / softcap) * softcap if softcap is not None else out


def _softmax(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Softmax over keys under a bool ``allowed`` mask or an additive one."""
    if mask.dtype == torch.bool:
        return torch.softmax(logits.masked_fill(~mask, float("-inf")), dim=-1)
    return torch.softmax(logits + mask.float(), dim=-1)


def _allowed(qpos: torch.Tensor, kpos: torch.Tensor, window: int | None) -> torch.Tensor:
    """``[Q, K]`` causal mask by absolute positions; with ``window``, only the last ``window`` keys (incl. self)."""
    ok = kpos[None, :] <= qpos[:, None]
    if window is not None:
        ok &= kpos[None, :] > qpos[:, None] - window
    return ok


@dataclass(frozen=True)
class Split:
    """Layout of a two-suffix pass: ``[0, prefix)`` prefix, ``[prefix, main)`` query, ``[main, end)`` "N/A".

    The caller passes position ids ``0..main-1`` then ``prefix..``. For each layer in ``heads`` (layer ->
    head indices), ``on_layer(layer, query_rows, na_rows)`` gets both suffixes' rows ``[B, heads, keys]`` as
    soon as the layer has run; nothing is kept, so rows of all layers never pile up.
    """

    prefix: int
    main: int
    heads: dict[int, list[int]] = field(default_factory=dict)
    on_layer: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None


def _split_attention(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, split: Split,
                     dropout: float, scaling: float | None, kwargs: dict[str, Any]) -> tuple[torch.Tensor, None]:
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    M = split.main
    window = kwargs.pop("sliding_window", None) or getattr(module, "sliding_window", None)
    softcap = kwargs.get("softcap")
    q_main, k_main, v_main = query[:, :, :M], key[:, :, :M], value[:, :, :M]
    layer = getattr(module, "layer_idx", None)
    heads = split.heads.get(layer) if split.on_layer is not None else None
    if heads:
        q_rows = attention_rows(q_main, k_main, heads, (split.prefix, M), None, scaling, softcap, window)
    main_mask = None
    if window is not None and M > window:  # what SDPA's own mask function materializes for a sliding layer
        pos = torch.arange(M, device=query.device)
        main_mask = _allowed(pos, pos, window)[None, None]
    out_main, _ = sdpa_attention_forward(module, q_main, k_main, v_main, main_mask, dropout=dropout,
                                         scaling=scaling, is_causal=main_mask is None, **kwargs)
    out_na, na_rows = _na_attention(query, key, value, split, window, scaling, softcap)
    if heads:
        split.on_layer(layer, q_rows, na_rows[:, heads])
    return torch.cat([out_main, out_na], dim=1), None


def _na_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, split: Split, window: int | None,
                  scaling: float | None, softcap: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The "N/A" rows over the prefix keys and their own, one KV group at a time: a few query rows, so plain
    float32 attention, with no copy or repeat of the prefix K/V. Returns the output ``[B, n, H, D]`` and every
    head's attention row ``[B, H, P + n]`` (mean over the "N/A" tokens)."""
    P, M = split.prefix, split.main
    B, H, T, D = query.shape
    n_kv, n = key.shape[1], T - M
    r = H // n_kv
    dev = query.device
    scale = scaling if scaling is not None else D ** -0.5
    allowed = _allowed(torch.arange(P, P + n, device=dev), torch.arange(P + n, device=dev), window)
    out = value.new_empty(B, n, H, value.shape[-1])
    probs_by_head = []
    for g in range(n_kv):
        heads = slice(g * r, (g + 1) * r)
        probs = _softmax(_logits(query[:, heads, M:], [key[:, g:g + 1, :P], key[:, g:g + 1, M:]], scale, softcap),
                         allowed)  # [B, r, n, P + n]
        pv = probs.to(value.dtype)
        o = torch.matmul(pv[..., :P], value[:, g:g + 1, :P]) + torch.matmul(pv[..., P:], value[:, g:g + 1, M:])
        out[:, :, heads] = o.transpose(1, 2)
        probs_by_head.append(probs.mean(dim=-2))
    return out, torch.cat(probs_by_head, dim=1)


def _capture_attention(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                       is_causal: bool | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    split = _SPLIT.get()
    if split is not None:
        return _split_attention(module, query, key, value, split, dropout, scaling, kwargs)
    rec = _RECORDER.get()
    if rec is not None:
        rec.record(module, query, key, attention_mask, scaling, kwargs.get("softcap"))
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  is_causal=is_causal, **kwargs)


def _mask(*args: Any, **kwargs: Any) -> Any:
    """SDPA's mask function; none in a split pass, whose attention builds its own two small masks."""
    from transformers.masking_utils import sdpa_mask

    return None if _SPLIT.get() is not None else sdpa_mask(*args, **kwargs)


def register() -> str:
    """Register the capture function and its mask function under :data:`ATTN_NAME`."""
    global _registered
    if not _registered:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface

        AttentionInterface.register(ATTN_NAME, _capture_attention)
        AttentionMaskInterface.register(ATTN_NAME, _mask)
        _registered = True
    return ATTN_NAME


def split_supported(config: Any) -> bool:
    """Whether :class:`Split` knows every mask this model uses (causal, optionally a sliding window)."""
    from routehead.model import text_config

    cfg = text_config(config)
    kinds = set(getattr(cfg, "layer_types", None) or ["full_attention"])
    return kinds <= {"full_attention", "sliding_attention"} and getattr(cfg, "attention_chunk_size", None) is None


def install(model: Any) -> None:
    """Switch a loaded model to the capturing attention (outputs stay SDPA's)."""
    register()
    try:
        model.set_attn_implementation(ATTN_NAME)
    except Exception:  # older transformers: set the config field directly, on every sub-config
        for cfg in {id(c): c for c in [model.config, getattr(model.config, "text_config", None)] if c}.values():
            cfg._attn_implementation = ATTN_NAME


@contextlib.contextmanager
def _bound(var: contextvars.ContextVar[Any], value: Any) -> Iterator[Any]:
    token = var.set(value)
    try:
        yield value
    finally:
        var.reset(token)


def recording(recorder: Recorder | None) -> contextlib.AbstractContextManager[Recorder | None]:
    return _bound(_RECORDER, recorder)


def splitting(split: Split | None) -> contextlib.AbstractContextManager[Split | None]:
    return _bound(_SPLIT, split)


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
