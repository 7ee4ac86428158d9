"""Attention capture through transformers' attention-function registry, and early exit after a layer.

The registered function returns exactly what SDPA returns (so the model's outputs are unchanged) and, when
a :class:`Recorder` is active, computes ``softmax(q K^T * scale + mask)`` for the query-span rows of the
requested heads only, averaged over the query tokens: an ``[heads, keys]`` row per layer, never ``T x T``.
The mask is the one the model passes to attention (causal, padding, sliding window), produced by the same
mask function SDPA uses: a custom attention name must register its mask function too.

Two suffixes in one pass (:class:`Split`): the sequence ``prefix + query + "N/A"`` runs once, with the "N/A"
tokens given the positions right after the prefix. Each layer then attends in two branches: prefix and
query causally (the plain pass: one SDPA call over every row, whose "N/A" rows are then overwritten), and "N/A"
over the prefix and itself only, exactly as if it ran alone after the prefix. No KV cache is kept, so memory is
that of one plain pass over the prompt. The deepest layer a pass reads stops inside its attention, once its
rows are taken: that layer's output (SDPA, output projection, MLP) is never computed. Several prompts can
share the pass as rows of a batch (right-padded; see :class:`Split`). The span rows of both suffixes come from
fused Triton kernels on a GPU (:mod:`routehead.engine.span_kernel`, chosen by :func:`kernel`) and from float32 torch
ops elsewhere.

Nothing here indexes a device tensor with a Python list or builds one from a list mid-pass: either makes the
host wait for the GPU, and a pass of many small kernels then costs the host's time plus the GPU's.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from routehead.engine import span_kernel
from routehead.engine.layers import StopForward, decoder_layers, exit_after  # noqa: F401 (the pass's exit)
from routehead.engine.rows import allowed_keys, attention_rows, masked_softmax, span_logits, span_mean_rows, take

ATTN_NAME = "routehead_capture"
KERNELS = ("auto", "torch", "triton")

_RECORDER: contextvars.ContextVar[Recorder | None] = contextvars.ContextVar("routehead_recorder", default=None)
_SPLIT: contextvars.ContextVar[Split | None] = contextvars.ContextVar("routehead_split", default=None)
_DEFAULT_KERNEL = os.environ.get("ROUTEHEAD_KERNEL", "auto")  # a call, so not inline (ruff B039)
_KERNEL: contextvars.ContextVar[str] = contextvars.ContextVar("routehead_kernel", default=_DEFAULT_KERNEL)
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


@dataclass(frozen=True)
class Split:
    """Layout of a two-suffix pass over B prompts, one per batch row. Row ``b``: ``[0, prefix[b])`` prefix,
    ``[prefix[b], main[b])`` query, padding up to ``width = max(main)``, then ``[width, end)`` "N/A" (the same
    tokens in every row).

    The caller passes position ids ``0..width-1`` then ``prefix[b]..``. Padding sits after every real token
    of the causal part and "N/A" never sees it, so it changes nothing. For each layer in ``heads`` (layer ->
    head indices), ``on_layer(layer, query_rows, na_rows)`` gets both suffixes' rows, ``[B, heads, width]``
    and ``[B, heads, max(prefix) + n]``, as soon as the layer has run; nothing is kept, so rows of all layers
    never pile up.
    """

    prefix: tuple[int, ...]
    main: tuple[int, ...]
    heads: dict[int, list[int]] = field(default_factory=dict)
    on_layer: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None
    _dev: dict[str, torch.Tensor] = field(default_factory=dict, repr=False, compare=False)

    @property
    def width(self) -> int:
        return max(self.main)

    def tensors(self, device: torch.device) -> dict[str, torch.Tensor]:
        """Per-row layout on ``device``, built once per pass and copied without making the host wait."""
        if not self._dev:
            P, M = torch.tensor(self.prefix), torch.tensor(self.main)
            offs = torch.arange(int((M - P).max()))
            valid = offs[None, :] < (M - P)[:, None]  # [B, Qmax] real query rows
            qidx = torch.where(valid, P[:, None] + offs[None, :], P[:, None])  # padding rows repeat the first
            # for the fused kernels: int32 indices, each real query row's share of its row's mean
            weight = (valid / valid.sum(-1, keepdim=True)).float()
            width = torch.full_like(P, int(M.max()))
            for name, t in (("prefix", P), ("qidx", qidx), ("valid", valid), ("weight", weight),
                            ("qidx32", qidx.int()), ("prefix32", P.int()), ("width32", width.int())):
                if device.type == "cuda":
                    t = t.pin_memory()
                self._dev[name] = t.to(device, non_blocking=True)
        return self._dev


def _split_attention(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, split: Split,
                     dropout: float, scaling: float | None, kwargs: dict[str, Any]) -> tuple[torch.Tensor, None]:
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    W, T = split.width, query.shape[2]
    window = kwargs.pop("sliding_window", None) or getattr(module, "sliding_window", None)
    softcap = kwargs.get("softcap")
    layer = getattr(module, "layer_idx", None)
    heads = split.heads.get(layer) if split.on_layer is not None else None
    lay = split.tensors(query.device)
    if heads:
        q_rows = _query_rows(query, key, heads, lay, split, scaling, softcap, window)
        if layer == max(split.heads):  # the deepest layer read: its output is never used, so no SDPA, no MLP
            _, na_rows = _na_attention(query, key, None, split, lay, window, scaling, softcap)
            split.on_layer(layer, q_rows, take(na_rows, heads))
            raise StopForward
    # One SDPA call over every row, "N/A" included, whose rows are then overwritten by their own branch: SDPA's
    # output is already the layer's [B, T, H, D] buffer, so the branches need no concatenation (a copy of the
    # whole layer's output). The "N/A" rows SDPA computes (they see the query) are never used.
    sliding = window is not None and T > window
    if sliding and WINDOW_BLOCK > 0:  # the band only, block by block (exact)
        out = _windowed(module, query, key, value, None, window, dropout, scaling, kwargs)
    else:  # causal (is_causal: SDPA skips the masked half), or the band as one T x T mask (blocking off)
        pos = torch.arange(T, device=query.device)
        band = allowed_keys(pos, pos, window)[None, None] if sliding else None
        out, _ = sdpa_attention_forward(module, query, key, value, band, dropout=dropout, scaling=scaling,
                                        is_causal=band is None, **kwargs)
    out_na, na_rows = _na_attention(query, key, value, split, lay, window, scaling, softcap)
    out[:, W:] = out_na
    if heads:
        split.on_layer(layer, q_rows, take(na_rows, heads))
    return out, None


def _query_rows(query: torch.Tensor, key: torch.Tensor, heads: list[int], lay: dict[str, torch.Tensor],
                split: Split, scaling: float | None, softcap: float | None, window: int | None) -> torch.Tensor:
    """``[B, len(heads), width]``: the query span's mean attention row per head over the causal part's keys."""
    W, qidx, valid = split.width, lay["qidx"], lay["valid"]
    k_main = key[:, :, :W]
    if fused(query, qidx.shape[1], softcap):
        r = query.shape[1] // key.shape[1]
        lo, hi = min(heads) // r * r, (max(heads) // r + 1) * r  # whole KV groups, as the torch path
        q32 = lay["qidx32"]
        got = _guarded(lambda: span_kernel.span_rows(query, k_main, None, q32, q32, lay["weight"], W, lay["width32"],
                                                     scaling=scaling, window=window, heads=(lo, hi)))
        if got is not None:
            return take(got[0], [h - lo for h in heads])
    q_main = query[:, :, :W]
    q_sel = q_main.gather(2, qidx[:, None, :, None].expand(-1, q_main.shape[1], -1, q_main.shape[-1]))
    return span_mean_rows(q_sel, k_main, heads, qidx, None, scaling, softcap, window, valid, min(split.prefix))


def _na_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor | None, split: Split,
                  lay: dict[str, torch.Tensor], window: int | None, scaling: float | None, softcap: float | None
                  ) -> tuple[torch.Tensor | None, torch.Tensor]:
    """The "N/A" rows over their row's prefix keys and their own, with no copy of the prefix K/V
    (``lay["prefix"]`` ``[B]``: each row's prefix length). Returns the output ``[B, n, H, D]`` (None without
    ``value``) and every head's attention row ``[B, H, max(prefix) + n]`` (mean over the "N/A" tokens).

    Fused kernels on a GPU (:mod:`routehead.engine.span_kernel`); otherwise a few query rows, so plain float32
    attention, every KV group in one batched product."""
    Pm, W = max(split.prefix), split.width
    B, H, T, D = query.shape
    n_kv, n = key.shape[1], T - W
    prefix = lay["prefix"]
    dev = query.device
    if fused(query, n, softcap):
        if "na_rows" not in lay:  # once per pass, not per layer
            own = torch.arange(n, device=dev, dtype=torch.int32)
            lay["na_rows"] = (W + own).expand(B, n).contiguous()
            lay["na_pos"] = lay["prefix32"][:, None] + own
            lay["na_weight"] = torch.full((B, n), 1.0 / n, device=dev)
        p32 = lay["prefix32"]
        got = _guarded(lambda: span_kernel.span_rows(query, key, value, lay["na_rows"], lay["na_pos"],
                                                     lay["na_weight"], Pm, p32, lb=n, b_start=W, b_base=p32,
                                                     scaling=scaling, window=window))
        if got is not None:
            return got[1], got[0]
    own = torch.arange(n, device=dev)
    qpos = prefix[:, None] + own  # [B, n]
    r = H // n_kv
    kpos = torch.arange(Pm, device=dev)
    to_prefix = allowed_keys(qpos, kpos, window) & (kpos < prefix[:, None, None])  # [B, n, Pm]
    to_own = allowed_keys(own, own, window).expand(B, n, n)  # same relative positions in every row
    allowed = torch.cat([to_prefix, to_own], dim=-1)[:, None]  # [B, 1, n, Pm + n]
    q = query[:, :, W:].reshape(B, n_kv, r * n, D)
    logits = span_logits(q, [key[:, :, :Pm], key[:, :, W:]], scaling, softcap).view(B, H, n, Pm + n)
    probs = masked_softmax(logits, allowed)
    if value is None:
        return None, probs.mean(dim=-2)
    pv = probs.to(value.dtype).view(B, n_kv, r * n, Pm + n)
    out = torch.matmul(pv[..., :Pm], value[:, :, :Pm]) + torch.matmul(pv[..., Pm:], value[:, :, W:])
    return out.view(B, H, n, value.shape[-1]).transpose(1, 2), probs.mean(dim=-2)


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
    window = kwargs.get("sliding_window") or getattr(module, "sliding_window", None)
    if window is not None and _band_only(attention_mask, query, key, window):
        kw = {k: v for k, v in kwargs.items() if k != "sliding_window"}
        return _windowed(module, query, key, value, attention_mask, window, dropout, scaling, kw), None
    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  is_causal=is_causal, **kwargs)


# Query rows per block of a sliding layer (256-1024 within 15 % of each other on CPU, Gemma-3); 0 turns blocking off
# (one SDPA call over the masked T x T, as before 2026-12-06: for comparisons).
WINDOW_BLOCK = int(os.environ.get("ROUTEHEAD_WINDOW_BLOCK", "512"))


def _blocks(T: int, window: int) -> Iterator[tuple[int, int, int]]:
    """``(i0, i1, k0)``: query rows ``[i0, i1)`` and the first key any of them may see (``i0 - window + 1``)."""
    step = WINDOW_BLOCK
    for i0 in range(0, T, step):
        yield i0, min(T, i0 + step), max(0, i0 - window + 1)


def _band_only(mask: torch.Tensor | None, query: torch.Tensor, key: torch.Tensor, window: int) -> bool:
    """Whether the model's own mask of a sliding layer can be applied block by block: a boolean ``[B, 1, T, T]``
    mask (no cache), long enough to pay, that allows no key left of each block's band (checked, so a model
    whose window is counted differently falls back to one SDPA call rather than losing a key)."""
    T = query.shape[2]
    if (mask is None or mask.dtype != torch.bool or mask.dim() != 4 or key.shape[2] != T
            or tuple(mask.shape[-2:]) != (T, T) or WINDOW_BLOCK <= 0 or T <= window + WINDOW_BLOCK):
        return False
    return not any(bool(mask[..., i0:i1, :k0].any()) for i0, i1, k0 in _blocks(T, window) if k0 > 0)


def _windowed(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
              window: int, dropout: float, scaling: float | None, kwargs: dict[str, Any]) -> torch.Tensor:
    """SDPA of a sliding-window layer, one block of query rows at a time over the keys its band can reach.

    Why: a sliding window is a mask SDPA cannot skip, so one call computes every ``T x T`` logit and throws most
    away (Gemma-3: 15 of 18 layers, 512-token window; at 3.2k tokens its SDPA was 41 % of the CPU pass). Block
    by block it computes ``T x (block + window)`` logits; every row sees exactly the keys it saw before, so
    outputs equal one call's up to float summation order. ``mask`` is the model's own ``[B, 1, T, T]`` boolean
    mask (sliced per block), or None for the pure causal band (built per block)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    T = query.shape[2]
    pos = torch.arange(T, device=query.device)
    parts = []
    for i0, i1, k0 in _blocks(T, window):
        m = mask[..., i0:i1, k0:i1] if mask is not None else allowed_keys(pos[i0:i1], pos[k0:i1], window)[None, None]
        part, _ = sdpa_attention_forward(module, query[:, :, i0:i1], key[:, :, k0:i1], value[:, :, k0:i1], m,
                                         dropout=dropout, scaling=scaling, is_causal=False, **kwargs)
        parts.append(part)
    return torch.cat(parts, dim=1)


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
    from routehead.engine.model import text_config

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


def fused(query: torch.Tensor, n_rows: int, softcap: float | None) -> bool:
    """Whether span rows are computed by the fused kernels: ``auto`` where they apply (CUDA with Triton),
    ``triton`` wherever they can run (also Triton's CPU interpreter), ``torch`` never. After a kernel has
    failed in this process (:data:`FUSED_ERROR`), never."""
    name = _checked(_KERNEL.get())
    if name == "torch" or FUSED_ERROR:
        return False
    ok = span_kernel.supports(query, n_rows, softcap)
    return ok and (name == "triton" or query.is_cuda)


FUSED_ERROR: list[str] = []  # why the fused kernels were switched off in this process, if they were


def _guarded(run: Callable[[], Any]) -> Any:
    """``run()``, or None (and the fused kernels off for this process, with a warning) if Triton fails here,
    e.g. an unsupported GPU or a broken compiler install: the torch path then gives the same scores."""
    try:
        return run()
    except Exception as exc:  # Triton's compile and launch errors have no common base class
        if _KERNEL.get() == "triton":
            raise
        FUSED_ERROR.append(f"{type(exc).__name__}: {exc}"[:500])
        warnings.warn(f"routehead: fused span kernels failed, using torch ops instead ({FUSED_ERROR[-1][:200]})",
                      RuntimeWarning, stacklevel=2)
        return None


@contextlib.contextmanager
def _bound(var: contextvars.ContextVar[Any], value: Any) -> Iterator[Any]:
    token = var.set(value)
    try:
        yield value
    finally:
        var.reset(token)


def recording(recorder: Recorder | None) -> contextlib.AbstractContextManager[Recorder | None]:
    return _bound(_RECORDER, recorder)


def kernel(name: str) -> contextlib.AbstractContextManager[str]:
    """Choose how span rows are computed inside the block: ``auto`` (default; env ``ROUTEHEAD_KERNEL``),
    ``torch`` or ``triton`` (see :func:`fused`). The scores are the same up to float32 summation order."""
    return _bound(_KERNEL, _checked(name))


def _checked(name: str) -> str:
    if name not in KERNELS:
        raise ValueError(f"unknown kernel {name!r} (capture.kernel or ROUTEHEAD_KERNEL); use one of "
                         f"{', '.join(KERNELS)}")
    return name


def splitting(split: Split | None) -> contextlib.AbstractContextManager[Split | None]:
    return _bound(_SPLIT, split)
