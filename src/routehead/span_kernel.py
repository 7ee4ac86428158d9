"""Fused query-span attention rows on a GPU (Triton): the few rows ICR needs, without their float32 logits.

The torch path (:func:`routehead.capture._rows`) materializes ``[heads, span rows, keys]`` float32 logits per
layer, then a softmax, a mean and a mask over them: four passes over memory per layer, which cost the 8B shape
about 45 ms of a 1.4 s pass at 32k tokens. Here each row's softmax statistics and its mean over the span come
out of two passes that never write a logit: split over key chunks so that every SM has work, as flash-decoding
does.

- pass 1, per (batch row, head, key chunk): each span row's running max and sum of ``exp`` (online softmax);
- combine (torch, ``[B, heads, chunks, rows]``): each row's max and ``1 / sum``;
- pass 2, per (batch row, head, key chunk): ``p = exp(s - max) / sum``; the span-weighted mean of ``p`` over
  the rows is written per key (the attention row ICR reads), and optionally ``p @ V`` per chunk, summed in
  torch: the attention output of those rows (the "N/A" branch needs it, the query rows do not).

Keys are a virtual concatenation of two segments of one K/V tensor, so that "N/A" reads its prefix keys and
its own keys without a copy: segment A is ``K[:, :, :LA]`` (positions = indices; only the first ``alen[b]``
exist in row ``b``), segment B is ``K[:, :, b_start:b_start + LB]`` at positions ``b_base[b] + j``. A key is
visible to a row at position ``p`` iff it exists, its position is ``<= p`` and, with a window, ``> p - window``:
the mask of :func:`routehead.capture._allowed`. Logits are the exact products of the inputs (16-bit inputs
accumulate in float32 on tensor cores; float32 inputs use IEEE products, never TF32).

Used for CUDA tensors when Triton imports; ``TRITON_INTERPRET=1`` runs the same kernels on CPU (the tests).
"""

from __future__ import annotations

import os

import torch

try:  # Triton ships with torch's CUDA wheels; without it the torch path is used
    import triton
    import triton.language as tl
except Exception:  # pragma: no cover - depends on the install
    triton = None
    tl = None

BLOCK_N = 64  # keys per step of a program's loop
BLOCK_M = 64  # span rows per program; longer spans run in several blocks of rows
MAX_DIM = 256
TARGET_PROGRAMS = 1024  # key chunks per head so that a launch fills a large GPU


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def supports(query: torch.Tensor, n_rows: int, softcap: float | None) -> bool:
    """Whether the fused kernels can compute these rows: Triton present, a CUDA tensor (or Triton's CPU
    interpreter), no softcap, a head size that fits one program."""
    return (triton is not None and (query.is_cuda or interpreting()) and softcap is None and n_rows > 0
            and query.shape[-1] <= MAX_DIM)


if triton is not None:

    @triton.jit
    def _block(q, K, kbase, skn, skd, qpos, start, LA, LB, B_START, alen, bbase, scale, window,
               D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, HAS_WINDOW: tl.constexpr,
               IEEE: tl.constexpr):
        """Scaled, masked logits ``[rows, BLOCK_N]`` of one key block, with the keys' physical indices."""
        offs_n = start + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        in_a = offs_n < LA
        phys = tl.where(in_a, offs_n, B_START + offs_n - LA)
        kpos = tl.where(in_a, offs_n, bbase + offs_n - LA)
        kval = tl.where(in_a, offs_n < alen, offs_n < LA + LB)
        k = tl.load(K + kbase + phys[None, :] * skn + offs_d[:, None] * skd,
                    mask=kval[None, :] & (offs_d < D)[:, None], other=0.0)
        if IEEE:
            s = tl.dot(q, k, input_precision="ieee")
        else:
            s = tl.dot(q, k)
        s = s * scale
        ok = kval[None, :] & (kpos[None, :] <= qpos[:, None])
        if HAS_WINDOW:
            ok = ok & (kpos[None, :] > qpos[:, None] - window)
        return tl.where(ok, s, float("-inf")), phys, kval, offs_n

    @triton.jit
    def _load_rows(Q, QROW, QPOS, b, h, sqb, sqh, sqm, sqd, n_rows,
                   D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
        offs_m = tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        rmask = offs_m < n_rows
        row = tl.load(QROW + b * n_rows + offs_m, mask=rmask, other=0)
        qpos = tl.load(QPOS + b * n_rows + offs_m, mask=rmask, other=0)
        q = tl.load(Q + b * sqb + h * sqh + row[:, None] * sqm + offs_d[None, :] * sqd,
                    mask=rmask[:, None] & (offs_d < D)[None, :], other=0.0)
        return q, qpos

    @triton.jit
    def _stats_kernel(Q, K, QROW, QPOS, ALEN, BBASE, MPART, LPART,
                      sqb, sqh, sqm, sqd, skb, skh, skn, skd,
                      n_rows, LA, LB, B_START, head_lo, chunk, n_chunks, scale, window, NH,
                      GROUP: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, HAS_WINDOW: tl.constexpr, IEEE: tl.constexpr):
        pid = tl.program_id(0)
        c = pid % n_chunks
        bh = pid // n_chunks
        b = (bh // NH).to(tl.int64)  # row offsets of a large batch overflow int32
        hh = bh % NH
        h = head_lo + hh
        q, qpos = _load_rows(Q, QROW, QPOS, b, h, sqb, sqh, sqm, sqd, n_rows, D, BLOCK_M, BLOCK_D)
        alen = tl.load(ALEN + b)
        bbase = tl.load(BBASE + b)
        kbase = b * skb + (h // GROUP) * skh
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        c0 = c * chunk
        c1 = tl.minimum(c0 + chunk, LA + LB)
        for start in range(c0, c1, BLOCK_N):
            s, phys, kval, offs_n = _block(q, K, kbase, skn, skd, qpos, start, LA, LB, B_START, alen, bbase,
                                           scale, window, D, BLOCK_N, BLOCK_D, HAS_WINDOW, IEEE)
            s = tl.where((offs_n < c1)[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            l_i = l_i * tl.exp(m_i - m_safe) + tl.sum(tl.exp(s - m_safe[:, None]), 1)
            m_i = m_new
        offs_m = tl.arange(0, BLOCK_M)
        tl.store(MPART + pid * BLOCK_M + offs_m, m_i)
        tl.store(LPART + pid * BLOCK_M + offs_m, l_i)

    @triton.jit
    def _rows_kernel(Q, K, V, QROW, QPOS, W, ALEN, BBASE, MROW, INVL, ROWS, OPART,
                     sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd, srb, srh, srn,
                     n_rows, LA, LB, B_START, head_lo, chunk, n_chunks, scale, window, NH,
                     GROUP: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, HAS_WINDOW: tl.constexpr, IEEE: tl.constexpr,
                     WITH_OUT: tl.constexpr):
        pid = tl.program_id(0)
        c = pid % n_chunks
        bh = pid // n_chunks
        b = (bh // NH).to(tl.int64)  # row offsets of a large batch overflow int32
        hh = bh % NH
        h = head_lo + hh
        q, qpos = _load_rows(Q, QROW, QPOS, b, h, sqb, sqh, sqm, sqd, n_rows, D, BLOCK_M, BLOCK_D)
        alen = tl.load(ALEN + b)
        bbase = tl.load(BBASE + b)
        kbase = b * skb + (h // GROUP) * skh
        vbase = b * svb + (h // GROUP) * svh
        offs_m = tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        rmask = offs_m < n_rows
        w = tl.load(W + b * n_rows + offs_m, mask=rmask, other=0.0)  # each row's weight in the mean
        m = tl.load(MROW + bh * BLOCK_M + offs_m)
        inv = tl.load(INVL + bh * BLOCK_M + offs_m)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        c0 = c * chunk
        c1 = tl.minimum(c0 + chunk, LA + LB)
        for start in range(c0, c1, BLOCK_N):
            s, phys, kval, offs_n = _block(q, K, kbase, skn, skd, qpos, start, LA, LB, B_START, alen, bbase,
                                           scale, window, D, BLOCK_N, BLOCK_D, HAS_WINDOW, IEEE)
            inside = offs_n < c1
            p = tl.exp(s - m[:, None]) * inv[:, None]
            p = tl.where(inside[None, :], p, 0.0)
            tl.store(ROWS + b * srb + hh * srh + offs_n * srn, tl.sum(p * w[:, None], 0), mask=inside)
            if WITH_OUT:
                v = tl.load(V + vbase + phys[:, None] * svn + offs_d[None, :] * svd,
                            mask=(kval & inside)[:, None] & (offs_d < D)[None, :], other=0.0)
                pv = p.to(V.dtype.element_ty)
                if IEEE:
                    acc += tl.dot(pv, v, input_precision="ieee")
                else:
                    acc += tl.dot(pv, v)
        if WITH_OUT:
            tl.store(OPART + (pid * BLOCK_M + offs_m[:, None]) * BLOCK_D + offs_d[None, :], acc)


def span_rows(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor | None, qrow: torch.Tensor,
              qpos: torch.Tensor, weight: torch.Tensor, la: int, alen: torch.Tensor, lb: int = 0, b_start: int = 0,
              b_base: torch.Tensor | None = None, scaling: float | None = None, window: int | None = None,
              heads: tuple[int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Mean attention row ``[B, heads, la + lb]`` (float32) over span rows, and their output with ``value``.

    ``query`` ``[B, H, *, D]``: the span rows are ``query[b, :, qrow[b, i]]`` at positions ``qpos[b, i]``
    (``[B, M]``), weighted by ``weight[b, i]`` in the mean (a row's weights sum to 1; 0 for padding rows);
    ``key``/``value`` ``[B, H_kv, S, D]`` (grouped-query heads read their group's K, never repeated). Keys are
    segment A, ``[0, la)`` (the first ``alen[b]`` exist in row ``b``), then segment B, ``[b_start, b_start + lb)``
    at positions ``b_base[b] + j`` (see the module's docstring). ``heads``: the ``[lo, hi)`` range of query heads
    to compute (default: all; with ``value``, all). The output is ``[B, M, H, D]`` in ``value``'s dtype.

    Spans longer than :data:`BLOCK_M` rows run in blocks of rows: the mean is a weighted sum, so the blocks'
    rows add up.
    """
    B, H, _, D = query.shape
    M = qrow.shape[1]
    lo, hi = heads if heads is not None else (0, H)
    if value is not None and (lo, hi) != (0, H):
        raise ValueError("the attention output needs every head")
    cfg = _Launch(query, key, value, la, alen.to(torch.int32).contiguous(),
                  (alen if b_base is None else b_base).to(torch.int32).contiguous(), lb, b_start, lo, hi - lo,
                  float(scaling if scaling is not None else D ** -0.5), window)
    qrow, qpos, weight = qrow.to(torch.int32), qpos.to(torch.int32), weight.float()
    rows, outs = None, []
    for r0 in range(0, M, BLOCK_M):
        sub = slice(r0, min(M, r0 + BLOCK_M))
        r, o = cfg.run(qrow[:, sub].contiguous(), qpos[:, sub].contiguous(), weight[:, sub].contiguous())
        rows = r if rows is None else rows.add_(r)
        outs.append(o)
    if value is None:
        return rows, None
    return rows, outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)


def _ceil(a: int, b: int) -> int:
    return -(-a // b)


class _Launch:
    """One span's two kernel launches for a block of at most :data:`BLOCK_M` rows."""

    def __init__(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor | None, la: int,
                 alen: torch.Tensor, b_base: torch.Tensor, lb: int, b_start: int, lo: int, nh: int, scale: float,
                 window: int | None) -> None:
        self.query, self.key, self.value = query, key, value
        self.la, self.alen, self.b_base, self.lb, self.b_start = la, alen, b_base, lb, b_start
        self.lo, self.nh, self.scale, self.window = lo, nh, scale, window
        B, H, _, D = query.shape
        total = la + lb
        n_chunks = max(1, min(_ceil(total, BLOCK_N), _ceil(TARGET_PROGRAMS, B * nh)))
        self.chunk = _ceil(_ceil(total, n_chunks), BLOCK_N) * BLOCK_N  # whole key blocks
        self.n_chunks = _ceil(total, self.chunk)
        self.bd = max(16, triton.next_power_of_2(D))
        self.const = dict(GROUP=H // key.shape[1], D=D, BLOCK_N=BLOCK_N, BLOCK_D=self.bd,
                          HAS_WINDOW=window is not None, IEEE=query.dtype == torch.float32)

    def run(self, qrow: torch.Tensor, qpos: torch.Tensor, weight: torch.Tensor
            ) -> tuple[torch.Tensor, torch.Tensor | None]:
        q, k, v = self.query, self.key, self.value
        B, M = qrow.shape
        bm = max(16, triton.next_power_of_2(M))
        dev, total, nc = q.device, self.la + self.lb, self.n_chunks
        grid = (B * self.nh * nc,)
        args = (M, self.la, self.lb, self.b_start, self.lo, self.chunk, nc, self.scale, self.window or 0, self.nh)
        const = dict(BLOCK_M=bm, **self.const)
        mpart = torch.empty(B * self.nh * nc, bm, device=dev, dtype=torch.float32)
        lpart = torch.empty_like(mpart)
        _stats_kernel[grid](q, k, qrow, qpos, self.alen, self.b_base, mpart, lpart, *q.stride(), *k.stride(),
                            *args, **const)
        mp = mpart.view(B * self.nh, nc, bm)
        mrow = mp.amax(1)
        mrow = torch.where(torch.isinf(mrow), torch.zeros_like(mrow), mrow)
        inv = 1.0 / (lpart.view(B * self.nh, nc, bm) * torch.exp(mp - mrow[:, None])).sum(1)
        rows = torch.empty(B, self.nh, total, device=dev, dtype=torch.float32)
        with_out = v is not None
        opart = torch.empty(B * self.nh * nc, bm, self.bd, device=dev, dtype=torch.float32) if with_out else mpart
        vv = v if with_out else k
        _rows_kernel[grid](q, k, vv, qrow, qpos, weight, self.alen, self.b_base, mrow, inv, rows, opart,
                           *q.stride(), *k.stride(), *vv.stride(), *rows.stride(), *args, WITH_OUT=with_out, **const)
        if not with_out:
            return rows, None
        out = opart.view(B, self.nh, nc, bm, self.bd).sum(2)[:, :, :M, :q.shape[-1]]
        return rows, out.transpose(1, 2).to(v.dtype)
