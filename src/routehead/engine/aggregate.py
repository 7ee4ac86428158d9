"""Aggregation, the one implementation every method, the forward pass, training and the store views use.

A head set's document scores: its heads' calibrated token scores summed (weighted for probability-weighted
routers), then per document the tokens not above ``mean - 2 std`` (unbiased std, strict ``>``, as ICR's
``masked_NA_calibration`` and QRHead's ``score_docs``) masked out, then the rest summed. With the first-stage
score as one more signal, both are standardised over the candidates and added (:func:`combine`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

Head = tuple[int, int]
N_STD = 2.0  # the references' outlier threshold: tokens not above mean - N_STD * std of their document are masked


@dataclass(frozen=True)
class HeadSet:
    """Heads whose calibrated token scores are summed (optionally weighted) before the outlier mask."""

    heads: tuple[Head, ...] | None  # None: every head of the model (ICR)
    weights: tuple[float, ...] | None = None  # one per head, aligned with ``heads``; None: plain sum

    @classmethod
    def of(cls, heads: Iterable[Head] | None, weights: Iterable[float] | None = None) -> HeadSet:
        hs = None if heads is None else tuple((int(a), int(b)) for a, b in heads)
        ws = None if weights is None else tuple(float(w) for w in weights)
        if hs is not None and ws is not None and len(ws) != len(hs):
            raise ValueError(f"{len(ws)} weights for {len(hs)} heads")
        return cls(hs, ws)


@dataclass(frozen=True)
class SpanIndex:
    """Token indices of each document span, padded to the longest: ``idx``/``valid`` ``[docs, width]``.

    Built once per prompt, on the scores' device, so that reducing every layer's rows needs no host-to-device
    copy (each such copy makes the host wait for the GPU).
    """

    idx: torch.Tensor
    valid: torch.Tensor

    @classmethod
    def build(cls, spans: Sequence[tuple[int, int]], device: torch.device | str = "cpu") -> SpanIndex:
        lengths = torch.tensor([e - s for s, e in spans], dtype=torch.long)
        starts = torch.tensor([s for s, _ in spans], dtype=torch.long)
        offs = torch.arange(max(int(lengths.max()) if len(spans) else 0, 1))
        valid = offs[None, :] < lengths[:, None]
        idx = torch.where(valid, starts[:, None] + offs[None, :], torch.zeros_like(offs)[None, :])
        return cls(idx.to(device), valid.to(device))

    @property
    def flat(self) -> torch.Tensor:
        """Every document's token indices, documents laid end to end (a token in two spans appears twice)."""
        return self.idx[self.valid]


def kept(x: torch.Tensor, valid: torch.Tensor, n_std: float = N_STD) -> torch.Tensor:
    """Which tokens of padded documents ``x`` ``[..., docs, width]`` (``valid`` marks real tokens) pass the
    outlier mask: above ``mean - n_std * std`` of their document's tokens, unbiased std, strict ``>``, so a
    one-token document (std NaN) and a constant document (no token above its mean) keep nothing."""
    v = valid.to(x.dtype)
    cnt = v.sum(-1)
    mean = (x * v).sum(-1) / cnt.clamp(min=1)
    var = (((x - mean[..., None]) * v) ** 2).sum(-1) / (cnt - 1)  # 0/0 = NaN for one token: nothing kept
    return valid & (x > (mean - n_std * var.sqrt())[..., None])


def mask_outliers_and_sum(token_scores: torch.Tensor, spans: Sequence[tuple[int, int]] | SpanIndex,
                          n_std: float = N_STD) -> torch.Tensor:
    """``[n, T]`` token scores -> ``[n, docs]``: per row and document, the sum of its :func:`kept` tokens."""
    si = spans if isinstance(spans, SpanIndex) else SpanIndex.build(spans, token_scores.device)
    x = token_scores[:, si.idx]  # [n, D, W]
    return (x * kept(x, si.valid, n_std)).sum(-1)


def spans_of(counts: Sequence[int]) -> SpanIndex:
    """Document spans over token rows laid end to end, ``counts[d]`` tokens for document d."""
    bounds = np.concatenate([[0], np.cumsum(np.asarray(counts, dtype=np.int64))]).tolist()
    return SpanIndex.build(list(zip(bounds[:-1], bounds[1:])))


def set_scores(rows: torch.Tensor, spans: SpanIndex, weights: torch.Tensor | Sequence[float] | None = None
               ) -> np.ndarray:
    """Document scores ``[docs]`` of the head set whose token rows are ``rows`` ``[n, T]``: summed (weighted),
    masked, summed over each document's tokens."""
    x = rows if weights is None else rows * torch.as_tensor(weights, dtype=rows.dtype)[:, None]
    return mask_outliers_and_sum(x.sum(0, keepdim=True), spans)[0].double().numpy()


def zscore(x: np.ndarray) -> np.ndarray:
    """Standardise along the last axis (documents); a constant row becomes zeros."""
    mu = x.mean(-1, keepdims=True)
    sd = x.std(-1, keepdims=True)
    return np.where(sd > 0, (x - mu) / np.where(sd > 0, sd, 1.0), 0.0)


def first_stage_signal(scores: Sequence[float] | None, n: int) -> np.ndarray:
    """The first-stage signal a router routes, z-scored over the candidates: the first stage's scores, or, when a
    caller gives none, the candidates' order (they arrive in first-stage order, best first, so the order is the
    first stage's ranking: minus the rank, which scores as BM25's own scores do on stored passes; BENCHMARKS.md)."""
    x = np.asarray(scores, dtype=np.float64) if scores is not None else -np.arange(n, dtype=np.float64)
    return zscore(x[None])[0]


def combine(attn: np.ndarray | None, first_stage: np.ndarray | None, fs_weight: float) -> np.ndarray:
    """A head set's scores plus the (z-scored) first-stage score: both standardised over the candidates, then
    added (``fs_weight`` on the first stage), since attention mass and BM25 have no common scale."""
    if attn is None:
        assert first_stage is not None
        return first_stage
    if first_stage is None or fs_weight == 0:
        return attn
    return zscore(attn) + fs_weight * first_stage

