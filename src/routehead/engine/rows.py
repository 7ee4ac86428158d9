"""Attention rows of a few query rows in float32 torch ops: the path the fused kernels
(:mod:`routehead.engine.span_kernel`) are tested against, and the one used wherever they do not run.

Only the query span's rows are computed (``softmax(q K^T * scale + mask)`` for those rows, averaged), never a
``T x T`` matrix; every KV group in one batched product; only slicing, no index lists, so a GPU never waits for
the host here.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


def attention_rows(query: torch.Tensor, key: torch.Tensor, heads: list[int], span: tuple[int, int],
                   attention_mask: torch.Tensor | None, scaling: float | None, softcap: float | None,
                   window: int | None = None) -> torch.Tensor:
    """``[B, len(heads), keys]``: the attention of query rows ``span`` per head, averaged over those rows.

    ``attention_mask`` None means causal, bottom-right aligned, within ``window`` keys when given.
    """
    s, e = span
    qpos = torch.arange(s, e, device=query.device) + (key.shape[2] - query.shape[2])
    mask = None if attention_mask is None else attention_mask[:, :, s:e, :]
    return span_mean_rows(query[:, :, s:e], key, heads, qpos, mask, scaling, softcap, window)


def span_mean_rows(q: torch.Tensor, key: torch.Tensor, heads: list[int], qpos: torch.Tensor, mask: torch.Tensor | None,
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
    logits = span_logits(qq, [key[:, g0:g1]], scaling, softcap).view(B, (g1 - g0) * r, Q, n_k)
    if mask is None:
        free = free_before if window is None else 0
        tail = allowed_keys(qpos, torch.arange(free, n_k, device=q.device), window)
        logits[..., free:].masked_fill_(~(tail[:, None] if tail.dim() == 3 else tail), float("-inf"))
        probs = torch.softmax(logits, dim=-1)
    else:
        probs = masked_softmax(logits, mask[:, g0 * r:g1 * r] if mask.shape[1] > 1 else mask)
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


def span_logits(q: torch.Tensor, keys: list[torch.Tensor], scaling: float | None, softcap: float | None
            ) -> torch.Tensor:
    """float32 ``q K^T * scale`` (softcapped) of query rows ``[B, G, n, D]`` over key blocks ``[B, G, K_i, D]``."""
    scale = scaling if scaling is not None else q.shape[-1] ** -0.5
    exact = q.is_cuda and q.dtype in (torch.bfloat16, torch.float16) and all(k.dtype == q.dtype for k in keys)
    with tf32(exact):
        parts = [torch.matmul(q.float(), k.float().transpose(-1, -2)) for k in keys]
    out = parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)  # one block: no copy
    out *= scale
    return torch.tanh(out / softcap) * softcap if softcap is not None else out


@contextlib.contextmanager
def tf32(on: bool) -> Iterator[None]:
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


def masked_softmax(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Softmax over keys under a bool ``allowed`` mask or an additive one."""
    if mask.dtype == torch.bool:
        return torch.softmax(logits.masked_fill(~mask, float("-inf")), dim=-1)
    return torch.softmax(logits + mask.float(), dim=-1)


def allowed_keys(qpos: torch.Tensor, kpos: torch.Tensor, window: int | None) -> torch.Tensor:
    """``[..., Q, K]`` causal mask by absolute positions (``qpos`` ``[..., Q]``, ``kpos`` ``[K]``); with
    ``window``, only the last ``window`` keys (incl. self)."""
    ok = kpos <= qpos[..., None]
    if window is not None:
        ok &= kpos > qpos[..., None] - window
    return ok
