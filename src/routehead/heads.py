"""Head selections and their document scores, the same way inference computes them.

Every method is a selection of heads over the same forward pass: ICR sums all heads, QRHead-style static
sets sum a fixed subset, RouteHead sums a per-query subset, the oracle picks per query with the labels. A
selection's document scores are always :func:`set_scores`: its heads' calibrated token scores summed (weighted
for ``prob``-weighted routers), then the outlier mask per document, then the sum over tokens
(:func:`routehead.scorer.mask_outliers_and_sum`, the one implementation used inside the forward pass too).
Per-head scores (one head masked alone) are QRHead's detection score.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from routehead.errors import RouteheadError
from routehead.scorer import SpanIndex, mask_outliers_and_sum

Head = tuple[int, int]


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


def rank_order(scores: np.ndarray) -> np.ndarray:
    """Indices best first along the last axis; ties keep input (first-stage) order, NaN ranks last."""
    s = np.where(np.isnan(scores), -np.inf, scores)
    return np.argsort(-s, axis=-1, kind="stable")


def ndcg_at_k(scores: np.ndarray, gains: np.ndarray, ideal: Sequence[float], k: int = 10) -> np.ndarray:
    """nDCG@k of one or many score vectors ``[..., docs]`` over the same candidates (trec_eval: linear gain).

    ``gains[d]`` is the judged grade of candidate d (0 if unjudged); ``ideal`` lists the grades of *all* judged
    relevant documents of the query, including those the first stage missed, as ranx and trec_eval do.
    Vectorised because label search and head detection score thousands of selections per query.
    """
    order = rank_order(scores)[..., :k]
    g = np.asarray(gains, dtype=np.float64)[order]
    disc = 1.0 / np.log2(np.arange(2, order.shape[-1] + 2))
    dcg = (g * disc).sum(-1)
    best = np.sort(np.asarray([x for x in ideal if x > 0], dtype=np.float64))[::-1][:k]
    idcg = float((best * (1.0 / np.log2(np.arange(2, len(best) + 2)))).sum())
    return dcg / idcg if idcg > 0 else np.zeros_like(dcg)


def per_head_quality(S: np.ndarray, gains: np.ndarray, ideal: Sequence[float], k: int = 10) -> np.ndarray:
    """nDCG@k of every head alone for one query: ``[layers, heads]``; -inf for a head not computed (NaN), so
    that it ranks last instead of inheriting the candidates' (first-stage) order from tied scores."""
    L, H, D = S.shape
    flat = S.reshape(L * H, D)
    q = ndcg_at_k(flat, gains, ideal, k)
    q[np.isnan(flat).any(-1)] = -np.inf
    return q.reshape(L, H)


def top_heads(quality: np.ndarray, top: int) -> list[Head]:
    """The ``top`` heads by mean quality ``[layers, heads]``; ties broken by (layer, head) for determinism."""
    L, H = quality.shape
    flat = [(-float(quality[lay, h]), lay, h) for lay in range(L) for h in range(H)]
    return [(lay, h) for _, lay, h in sorted(flat)[:top]]


def save_heads(path: str | Path, heads: Sequence[Head], identity: dict[str, Any], **meta: Any) -> None:
    """A head set as JSON, with the model identity it was detected for."""
    body = {"format": "routehead-heads-v2", "model": identity, "heads": [[int(a), int(b)] for a, b in heads], **meta}
    Path(path).write_text(json.dumps(body, indent=1))


def load_heads(path: str | Path, identity: dict[str, Any] | None = None) -> tuple[list[Head], dict[str, Any]]:
    """Read a head set; with ``identity``, refuse one detected for another model."""
    try:
        body = json.loads(Path(path).read_text())
        heads = [(int(a), int(b)) for a, b in body["heads"]]
        model = body["model"]
    except FileNotFoundError as exc:
        raise RouteheadError(f"head set file not found: {path}") from exc
    except (ValueError, KeyError, TypeError) as exc:
        raise RouteheadError(f"{path} is not a routehead head-set file ({type(exc).__name__}: {exc})") from exc
    if not heads:
        raise RouteheadError(f"{path} lists no heads")
    if body.get("format") != "routehead-heads-v2":
        raise RouteheadError(f"{path} was detected by an older routehead (per-head masking, another prompt); "
                             f"detect the heads again (routehead detect) or pass them as a list")
    if identity is not None:
        check_identity(model, identity, str(path))
    return heads, body


def check_identity(saved: dict[str, Any], current: dict[str, Any], what: str) -> None:
    """A head set or router is only meaningful for the model (and shape) it was made with."""
    keys = ("model", "num_layers", "num_heads")
    diff = [f"{k}: file has {saved.get(k)!r}, model has {current.get(k)!r}"
            for k in keys if saved.get(k) != current.get(k)]
    if diff:
        raise RouteheadError(f"{what} was made for another model ({'; '.join(diff)})")
