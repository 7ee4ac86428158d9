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
fused Triton kernels on a GPU (:mod:`routehead.span_kernel`, chosen by :func:`kernel`) and from float32 torch
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

from routehead import span_kernel

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


def attention_rows(query: torch.Tensor, key: torch.Tensor, heads: list[int], span: tuple[int, int],
                   attention_mask: torch.Tensor | None, scaling: float | None, softcap: float | None,
                   window: int | None = None) -> torch.Tensor:
    """``[B, len(heads), keys]``: the attention of query rows ``span`` per head, averaged over those rows.

    ``attention_mask`` None means causal, bottom-right aligned, within ``window`` keys when given.
    """
    s, e = span
    qpos = torch.arange(s, e, device=query.device) + (key.shape[2] - query.shape[2])
    mask = None if attention_mask is None else attention_mask[:, :, s:e, :]
    return _rows(query[:, :, s:e], key, heads, qpos, mask, scaling, softcap, window)


def _rows(q: torch.Tensor, key: torch.Tensor, heads: list[int], qpos: torch.Tensor, mask: torch.Tensor | None,
          scaling: float | None, softcap: float | None, window: int | None, valid: torch.Tensor | None = None,
          free_before: int = 0) -> torch.Tensor:
    """Mean attention row per head of query rows ``q`` ``[B, H, Q, D]`` at absolute positions ``qpos`` (``[Q]``
    or ``[B, Q]``), over all of ``key``'s positions; ``valid`` ``[B, Q]`` marks the rows to average (padding
    rows of a batch are left out). Keys before ``free_before`` are visible to every row (no window): only the
    rest is masked, which spares a pass over the long prefix.

    float32 logits of every head of the KV groups spanned by ``heads``, in one batched product over the groups
    (a grouped-query K is never repeated). Only slicing, no index lists: a GPU never waits for the host here.
    """
    B, H, Q, D = q.shape
    n_kv, n_k = key.shape[1], key.shape[2]
    r = H // n_kv
    g0, g1 = min(heads) // r, max(heads) // r + 1
    qq = q[:, g0 * r:g1 * r].reshape(B, g1 - g0, r * Q, D)  # a group's heads' rows together
    logits = _logits(qq, [key[:, g0:g1]], scaling, softcap).view(B, (g1 - g0) * r, Q, n_k)
    if mask is None:
        free = free_before if window is None else 0
        tail = _allowed(qpos, torch.arange(free, n_k, device=q.device), window)
        logits[..., free:].masked_fill_(~(tail[:, None] if tail.dim() == 3 else tail), float("-inf"))
        probs = torch.softmax(logits, dim=-1)
    else:
        probs = _softmax(logits, mask[:, g0 * r:g1 * r] if mask.shape[1] > 1 else mask)
    if valid is None:
        rows = probs.mean(dim=-2)
    else:
        w = valid.to(probs.dtype)
        rows = (probs * w[:, None, :, None]).sum(dim=-2) / w.sum(-1)[:, None, None]
    return take(rows, [h - g0 * r for h in heads])


def take(rows: torch.Tensor, idx: list[int]) -> torch.Tensor:
    """``rows[:, idx]`` by slices of consecutive indices: indexing a GPU tensor with a Python list copies the
    list to the device and makes the host wait for every queued kernel."""
    if idx == list(range(rows.shape[1])):
        return rows
    runs: list[list[int]] = []
    for i in idx:
        if runs and i == runs[-1][1]:
            runs[-1][1] += 1
        else:
            runs.append([i, i + 1])
    return torch.cat([rows[:, a:b] for a, b in runs], dim=1)


def _logits(q: torch.Tensor, keys: list[torch.Tensor], scaling: float | None, softcap: float | None
            ) -> torch.Tensor:
    """float32 ``q K^T * scale`` (softcapped) of query rows ``[B, G, n, D]`` over key blocks ``[B, G, K_i, D]``."""
    scale = scaling if scaling is not None else q.shape[-1] ** -0.5
    exact = q.is_cuda and q.dtype in (torch.bfloat16, torch.float16) and all(k.dtype == q.dtype for k in keys)
    with _tf32(exact):
        parts = [torch.matmul(q.float(), k.float().transpose(-1, -2)) for k in keys]
    out = parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)  # one block: no copy
    out *= scale
    return torch.tanh(out / softcap) * softcap if softcap is not None else out


@contextlib.contextmanager
def _tf32(on: bool) -> Iterator[None]:
    """TF32 tensor cores for float32 products of 16-bit values: a bf16/fp16 significand (8/11 bits) fits TF32's
    11 exactly, so the products and float32 sums are those of plain float32, at tensor-core speed."""
    mm = torch.backends.cuda.matmul
    if not on:
        yield
        return
    new_api = hasattr(mm, "fp32_precision")
    prev = mm.fp32_precision if new_api else mm.allow_tf32
    try:
        if new_api:
            mm.fp32_precision = "tf32"
        else:
            mm.allow_tf32 = True
        yield
    finally:
        if new_api:
            mm.fp32_precision = prev
        else:
            mm.allow_tf32 = prev


def _softmax(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Softmax over keys under a bool ``allowed`` mask or an additive one."""
    if mask.dtype == torch.bool:
        return torch.softmax(logits.masked_fill(~mask, float("-inf")), dim=-1)
    return torch.softmax(logits + mask.float(), dim=-1)


def _allowed(qpos: torch.Tensor, kpos: torch.Tensor, window: int | None) -> torch.Tensor:
    """``[..., Q, K]`` causal mask by absolute positions (``qpos`` ``[..., Q]``, ``kpos`` ``[K]``); with
    ``window``, only the last ``window`` keys (incl. self)."""
    ok = kpos <= qpos[..., None]
    if window is not None:
        ok &= kpos > qpos[..., None] - window
    return ok


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
    main_mask = None
    if window is not None and T > window:  # what SDPA's own mask function materializes for a sliding layer
        pos = torch.arange(T, device=query.device)
        main_mask = _allowed(pos, pos, window)[None, None]
    out, _ = sdpa_attention_forward(module, query, key, value, main_mask, dropout=dropout, scaling=scaling,
                                    is_causal=main_mask is None, **kwargs)
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
    return _rows(q_sel, k_main, heads, qidx, None, scaling, softcap, window, valid, min(split.prefix))


def _na_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor | None, split: Split,
                  lay: dict[str, torch.Tensor], window: int | None, scaling: float | None, softcap: float | None
                  ) -> tuple[torch.Tensor | None, torch.Tensor]:
    """The "N/A" rows over their row's prefix keys and their own, with no copy of the prefix K/V
    (``lay["prefix"]`` ``[B]``: each row's prefix length). Returns the output ``[B, n, H, D]`` (None without
    ``value``) and every head's attention row ``[B, H, max(prefix) + n]`` (mean over the "N/A" tokens).

    Fused kernels on a GPU (:mod:`routehead.span_kernel`); otherwise a few query rows, so plain float32
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
    to_prefix = _allowed(qpos, kpos, window) & (kpos < prefix[:, None, None])  # [B, n, Pm]
    to_own = _allowed(own, own, window).expand(B, n, n)  # same relative positions in every row
    allowed = torch.cat([to_prefix, to_own], dim=-1)[:, None]  # [B, 1, n, Pm + n]
    q = query[:, :, W:].reshape(B, n_kv, r * n, D)
    logits = _logits(q, [key[:, :, :Pm], key[:, :, W:]], scaling, softcap).view(B, H, n, Pm + n)
    probs = _softmax(logits, allowed)
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
