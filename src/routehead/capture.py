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
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

ATTN_NAME = "routehead_capture"

_RECORDER: contextvars.ContextVar[Recorder | None] = contextvars.ContextVar("routehead_recorder", default=None)
_SPLIT: contextvars.ContextVar[Split | None] = contextvars.ContextVar("routehead_split", default=None)
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
               scaling: float | None, softcap: float | None, window: int | None = None) -> None:
        """``attention_mask`` None means causal, bottom-right aligned, within ``window`` keys when given."""
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
            qpos = torch.arange(s, e, device=q.device) + (n_k - n_q)
            allowed = _allowed(qpos, torch.arange(n_k, device=q.device), window)
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


def _allowed(qpos: torch.Tensor, kpos: torch.Tensor, window: int | None) -> torch.Tensor:
    """``[Q, K]`` causal mask by absolute positions; with ``window``, only the last ``window`` keys (incl. self)."""
    ok = kpos[None, :] <= qpos[:, None]
    if window is not None:
        ok &= kpos[None, :] > qpos[:, None] - window
    return ok


@dataclass(frozen=True)
class Split:
    """Layout of a two-suffix pass: ``[0, prefix)`` prefix, ``[prefix, main)`` query, ``[main, end)`` "N/A".

    The caller passes position ids ``0..main-1`` then ``prefix..``; ``query``/``na`` record each suffix's rows
    (spans relative to its own branch: ``(prefix, main)`` and ``(0, n_na)``).
    """

    prefix: int
    main: int
    query: Recorder | None = None
    na: Recorder | None = None


def _split_attention(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, split: Split,
                     dropout: float, scaling: float | None, kwargs: dict[str, Any]) -> tuple[torch.Tensor, None]:
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    P, M = split.prefix, split.main
    window = kwargs.pop("sliding_window", None) or getattr(module, "sliding_window", None)
    softcap = kwargs.get("softcap")
    dev = query.device
    q_main, k_main, v_main = query[:, :, :M], key[:, :, :M], value[:, :, :M]
    q_na = query[:, :, M:]
    k_na = torch.cat([key[:, :, :P], key[:, :, M:]], dim=2)  # "N/A" sees the prefix and itself, never the query
    v_na = torch.cat([value[:, :, :P], value[:, :, M:]], dim=2)
    if split.query is not None:
        split.query.record(module, q_main, k_main, None, scaling, softcap, window)
    if split.na is not None:
        split.na.record(module, q_na, k_na, None, scaling, softcap, window)
    main_mask = None
    if window is not None and M > window:  # what SDPA's own mask function materializes for a sliding layer
        pos = torch.arange(M, device=dev)
        main_mask = _allowed(pos, pos, window)[None, None]
    out_main, _ = sdpa_attention_forward(module, q_main, k_main, v_main, main_mask, dropout=dropout,
                                         scaling=scaling, is_causal=main_mask is None, **kwargs)
    n_na = q_na.shape[2]
    na_mask = _allowed(torch.arange(P, P + n_na, device=dev), torch.arange(P + n_na, device=dev), window)
    out_na, _ = sdpa_attention_forward(module, q_na, k_na, v_na, na_mask[None, None], dropout=dropout,
                                       scaling=scaling, is_causal=False, **kwargs)
    return torch.cat([out_main, out_na], dim=1), None


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
def recording(recorder: Recorder | None) -> Iterator[Recorder | None]:
    token = _RECORDER.set(recorder)
    try:
        yield recorder
    finally:
        _RECORDER.reset(token)


@contextlib.contextmanager
def splitting(split: Split | None) -> Iterator[Split | None]:
    token = _SPLIT.set(split)
    try:
        yield split
    finally:
        _SPLIT.reset(token)


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
