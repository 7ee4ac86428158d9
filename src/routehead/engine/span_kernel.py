"""Fused query-span attention rows on a GPU (Triton): the few rows ICR needs, without their float32 logits.

The torch path (:func:`routehead.engine.capture._rows`) materializes ``[heads, span rows, keys]`` float32 logits per
layer, then a softmax, a mean and a mask over them: four passes over memory per layer, which cost the 8B shape
about 45 ms of a 1.4 s pass at 32k tokens. Here each row's softmax statistics and its mean over the span come
out of two passes that never write a logit: split over key chunks so that every SM has work, as flash-decoding
does.

- pass 1, per (batch row, head, key chunk): each span row's running max and sum of ``exp`` (online softmax);
- pass 2, per (batch row, head, key chunk): the chunks' statistics combined into each row's max and
  ``1 / sum``, then ``p = exp(s - max) / sum``; the span-weighted mean of ``p`` over
  the rows is written per key (the attention row ICR reads), and optionally ``p @ V`` per chunk, summed in
  torch: the attention output of those rows (the "N/A" branch needs it, the query rows do not).

Keys are a virtual concatenation of two segments of one K/V tensor, so that "N/A" reads its prefix keys and
its own keys without a copy: segment A is ``K[:, :, :LA]`` (positions = indices; only the first ``alen[b]``
exist in row ``b``), segment B is ``K[:, :, b_start:b_start + LB]`` at positions ``b_base[b] + j``. A key is
visible to a row at position ``p`` iff it exists, its position is ``<= p`` and, with a window, ``> p - window``:
the mask of :func:`routehead.engine.capture._allowed`. Logits are the exact products of the inputs (16-bit inputs
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
    interpreter), no softcap, a head size that fits one program, a dtype Triton's products take exactly."""
    return (triton is not None and (query.is_cuda or interpreting()) and softcap is None and n_rows > 0
            and query.shape[-1] <= MAX_DIM and query.dtype in (torch.float16, torch.bfloat16, torch.float32))


# Sizes that change from prompt to prompt: Triton would otherwise compile a variant for each new pattern of
# "equals 1" / "divisible by 16" among them, i.e. recompile in the middle of serving.
_SHAPES = ["n_rows", "LA", "LB", "B_START", "head_lo", "n_chunks", "n_blocks", "window", "NH"]

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
    def _program(pid, QROW, QPOS, ALEN, BBASE, n_rows, n_chunks, n_blocks, NH, head_lo, BLOCK_M: tl.constexpr):
        """A program's (chunk, row block, batch row, head) and its rows' indices and positions."""
        c = pid % n_chunks
        t = pid // n_chunks  # (batch row, head, row block)
        rb = t % n_blocks
        bh = t // n_blocks
        b = (bh // NH).to(tl.int64)  # row offsets of a large batch overflow int32
        hh = bh % NH
        m = rb * BLOCK_M + tl.arange(0, BLOCK_M)
        rmask = m < n_rows
        row = tl.load(QROW + b * n_rows + m, mask=rmask, other=0)
        qpos = tl.load(QPOS + b * n_rows + m, mask=rmask, other=0)
        return c, t, rb, b, hh, head_lo + hh, m, rmask, row, qpos, tl.load(ALEN + b), tl.load(BBASE + b)

    @triton.jit(do_not_specialize=_SHAPES)
    def _stats_kernel(Q, K, QROW, QPOS, ALEN, BBASE, MPART, LPART,
                      sqb, sqh, sqm, sqd, skb, skh, skn, skd,
                      n_rows, LA, LB, B_START, head_lo, chunk, n_chunks, n_blocks, scale, window, NH,
                      GROUP: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, HAS_WINDOW: tl.constexpr, IEEE: tl.constexpr):
        pid = tl.program_id(0)
        c, t, rb, b, hh, h, m, rmask, row, qpos, alen, bbase = _program(
            pid, QROW, QPOS, ALEN, BBASE, n_rows, n_chunks, n_blocks, NH, head_lo, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        q = tl.load(Q + b * sqb + h * sqh + row[:, None] * sqm + offs_d[None, :] * sqd,
                    mask=rmask[:, None] & (offs_d < D)[None, :], other=0.0)
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

    @triton.jit(do_not_specialize=_SHAPES + ["n_batch"])
    def _rows_kernel(Q, K, V, QROW, QPOS, W, ALEN, BBASE, MPART, LPART, ROWS, OPART,
                     sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
                     n_rows, LA, LB, B_START, head_lo, chunk, n_chunks, n_blocks, scale, window, NH, n_batch,
                     GROUP: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, HAS_WINDOW: tl.constexpr, IEEE: tl.constexpr,
                     WITH_OUT: tl.constexpr):
        pid = tl.program_id(0)
        c, t, rb, b, hh, h, m, rmask, row, qpos, alen, bbase = _program(
            pid, QROW, QPOS, ALEN, BBASE, n_rows, n_chunks, n_blocks, NH, head_lo, BLOCK_M)
        offs_m = tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        # every chunk's (max, sum) of these rows -> each row's max and 1 / sum over all keys
        mx = tl.full([BLOCK_M], float("-inf"), tl.float32)
        sm = tl.zeros([BLOCK_M], tl.float32)
        for cc in range(0, n_chunks):
            m_c = tl.load(MPART + (t * n_chunks + cc) * BLOCK_M + offs_m)
            l_c = tl.load(LPART + (t * n_chunks + cc) * BLOCK_M + offs_m)
            m_new = tl.maximum(mx, m_c)
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            sm = sm * tl.exp(mx - m_safe) + l_c * tl.exp(m_c - m_safe)
            mx = m_new
        mx = tl.where(mx == float("-inf"), 0.0, mx)
        inv = 1.0 / tl.where(sm > 0, sm, 1.0)
        q = tl.load(Q + b * sqb + h * sqh + row[:, None] * sqm + offs_d[None, :] * sqd,
                    mask=rmask[:, None] & (offs_d < D)[None, :], other=0.0)
        kbase = b * skb + (h // GROUP) * skh
        vbase = b * svb + (h // GROUP) * svh
        w = tl.load(W + b * n_rows + m, mask=rmask, other=0.0)  # each row's weight in the mean
        rows_base = ((rb * n_batch + b) * NH + hh) * (LA + LB)  # [row blocks, B, heads, keys]
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        c0 = c * chunk
        c1 = tl.minimum(c0 + chunk, LA + LB)
        for start in range(c0, c1, BLOCK_N):
            s, phys, kval, offs_n = _block(q, K, kbase, skn, skd, qpos, start, LA, LB, B_START, alen, bbase,
                                           scale, window, D, BLOCK_N, BLOCK_D, HAS_WINDOW, IEEE)
            inside = offs_n < c1
            p = tl.exp(s - mx[:, None]) * inv[:, None]
            p = tl.where(inside[None, :], p, 0.0)
            tl.store(ROWS + rows_base + offs_n, tl.sum(p * w[:, None], 0), mask=inside)
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

    Index tensors are best passed as contiguous int32 and ``weight`` as float32, made once per pass: each
    conversion here is one more kernel launch per layer, and on a fast GPU the host's launches are the cost.
    Spans longer than :data:`BLOCK_M` rows run as several blocks of rows in the same two launches; the mean is a
    weighted sum, so the blocks' rows add up.
    """
    B, H, _, D = query.shape
    M = qrow.shape[1]
    lo, hi = heads if heads is not None else (0, H)
    NH = hi - lo
    if value is not None and NH != H:
        raise ValueError("the attention output needs every head")
    qrow, qpos, alen = _as(qrow, torch.int32), _as(qpos, torch.int32), _as(alen, torch.int32)
    b_base = alen if b_base is None else _as(b_base, torch.int32)
    weight = _as(weight, torch.float32)
    total = la + lb
    bm = max(16, min(BLOCK_M, triton.next_power_of_2(M)))
    n_blocks = _ceil(M, bm)
    n_chunks = max(1, min(_ceil(total, BLOCK_N), _ceil(TARGET_PROGRAMS, B * NH * n_blocks)))
    chunk = _ceil(_ceil(total, n_chunks), BLOCK_N) * BLOCK_N  # whole key blocks
    n_chunks = _ceil(total, chunk)
    bd = max(16, triton.next_power_of_2(D))
    programs = B * NH * n_blocks * n_chunks
    dev = query.device
    args = (M, la, lb, b_start, lo, chunk, n_chunks, n_blocks,
            float(scaling if scaling is not None else D ** -0.5), window or 0, NH)
    const = dict(GROUP=H // key.shape[1], D=D, BLOCK_M=bm, BLOCK_N=BLOCK_N, BLOCK_D=bd,
                 HAS_WINDOW=window is not None, IEEE=query.dtype == torch.float32)
    mpart = torch.empty(programs, bm, device=dev, dtype=torch.float32)
    lpart = torch.empty_like(mpart)
    _stats_kernel[(programs,)](query, key, qrow, qpos, alen, b_base, mpart, lpart, *query.stride(), *key.stride(),
                               *args, **const)
    rows = torch.empty(n_blocks, B, NH, total, device=dev, dtype=torch.float32)
    with_out = value is not None
    opart = torch.empty(programs, bm, bd, device=dev, dtype=torch.float32) if with_out else mpart
    v = value if with_out else key
    _rows_kernel[(programs,)](query, key, v, qrow, qpos, weight, alen, b_base, mpart, lpart, rows, opart,
                              *query.stride(), *key.stride(), *v.stride(), *args, B, WITH_OUT=with_out, **const)
    rows = rows[0] if n_blocks == 1 else rows.sum(0)
    if not with_out:
        return rows, None
    out = opart.view(B, NH, n_blocks, n_chunks, bm, bd).sum(3).view(B, NH, n_blocks * bm, bd)[:, :, :M, :D]
    return rows, out.transpose(1, 2).to(value.dtype)


def _as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` as contiguous ``dtype``, with no dispatcher call when it already is (the usual case, per layer)."""
    return t if t.dtype == dtype and t.is_contiguous() else t.to(dtype).contiguous()


def _ceil(a: int, b: int) -> int:
    return -(-a // b)
