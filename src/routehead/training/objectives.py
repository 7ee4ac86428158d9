"""Training objectives of the router: the listwise loss through the aggregation, and the expected depth.

Both are differentiable stand-ins for what inference does: :func:`routed_scores` aggregates the probability-
weighted heads as the live pass aggregates a weighted head set (the outlier mask taken as fixed, through the one
mask of :mod:`routehead.engine.aggregate`), and :func:`expected_layers_run` is the exact expectation of the
fraction of layers a routed pass runs when each head is routed independently.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from routehead.engine.aggregate import kept
from routehead.offline.views import Query


def expected_layers_run(logits: torch.Tensor, head_layers: torch.Tensor, num_layers: int) -> torch.Tensor:
    """Expected fraction of layers a routed pass runs ``[Q]``, each head routed independently with probability
    ``sigmoid(logit)`` (``logits [Q, heads]``, ``head_layers [heads]``).

    The pass runs layer l when some routed head sits at layer >= l, so the expected count is
    ``sum_l 1 - prod_{h: layer(h) >= l} (1 - p_h)``; ``log(1 - p) = -softplus(logit)`` keeps it stable."""
    deep = (head_layers[None, :] >= torch.arange(num_layers)[:, None]).to(logits.dtype)  # [L, heads]
    none_deeper = torch.exp(-torch.nn.functional.softplus(logits) @ deep.T)  # [Q, L]
    return (1 - none_deeper).sum(-1) / num_layers


@dataclass
class Batch:
    """Training queries padded together: token rows ``X [Q, pool, T]``, each document's token indices
    ``idx``/``valid`` ``[Q, D, W]``, grades ``G [Q, D]``, candidate mask ``M [Q, D]``, first stage ``F [Q, D]``,
    and each head's spread of scores alone over the candidates ``A [Q, pool]`` (its scale on that query)."""

    X: torch.Tensor
    idx: torch.Tensor
    valid: torch.Tensor
    G: torch.Tensor
    M: torch.Tensor
    F: torch.Tensor
    A: torch.Tensor


def padded(queries: list[Query]) -> Batch:
    T = max(q.rows.shape[1] for q in queries)
    D = max(q.spans.idx.shape[0] for q in queries)
    W = max(q.spans.idx.shape[1] for q in queries)
    n = queries[0].rows.shape[0]
    b = Batch(torch.zeros(len(queries), n, T), torch.zeros(len(queries), D, W, dtype=torch.long),
              torch.zeros(len(queries), D, W, dtype=torch.bool), torch.zeros(len(queries), D),
              torch.zeros(len(queries), D, dtype=torch.bool), torch.zeros(len(queries), D), torch.ones(len(queries), n))
    for i, q in enumerate(queries):
        t, (d, w) = q.rows.shape[1], q.spans.idx.shape
        b.X[i, :, :t] = q.rows
        b.idx[i, :d, :w], b.valid[i, :d, :w] = q.spans.idx, q.spans.valid
        b.G[i, :d] = torch.as_tensor(q.gains, dtype=torch.float32)
        b.M[i, :d] = True
        if q.first_stage is not None:
            b.F[i, :d] = torch.as_tensor(q.first_stage, dtype=torch.float32)
        b.A[i] = torch.as_tensor(q.single.std(-1), dtype=torch.float32).clamp(min=1e-12)
    return b


def document_sums(tok: torch.Tensor, b: Batch) -> torch.Tensor:
    """Document scores ``[Q, D]`` from token scores ``tok`` ``[Q, T]``: each document's tokens that pass the outlier
    mask, summed, as inference sums them (the mask taken as fixed: no gradient through which tokens pass it)."""
    x = torch.gather(tok, 1, b.idx.flatten(1)).view(b.idx.shape)  # [Q, D, W]
    with torch.no_grad():
        keep = kept(x, b.valid)
    return (x * keep).sum(-1)


def routed_scores(P: torch.Tensor, b: Batch, use_first_stage: bool) -> torch.Tensor:
    """Document scores ``[Q, D]`` of the probability-weighted head sets, aggregated as inference does (weighted
    token sum, outlier mask per document, sum), divided by the weighted heads' scale on the query, plus the
    weighted first stage. The division is one positive number per query (the ranking is inference's); unlike
    standardising the sum it stays linear in each head's weight, so a relevant document that one head puts
    far ahead keeps a gradient. The mask is taken as fixed (no gradient through which tokens pass it)."""
    heads = P[:, :b.X.shape[1]]
    s = document_sums(torch.einsum("qn,qnt->qt", heads, b.X), b) / (heads * b.A).sum(1, keepdim=True).clamp(min=1e-12)
    if use_first_stage:
        s = s + P[:, -1:] * b.F
    return s


def listwise_loss(P: torch.Tensor, b: Batch, temperature: float, use_first_stage: bool,
                  weights: torch.Tensor | None = None) -> torch.Tensor:
    """ListNet cross-entropy of the routed (probability-weighted) document scores against the grades, averaged
    over queries (``weights``: each query's share, mean 1)."""
    return listnet(routed_scores(P, b, use_first_stage), b, temperature, weights)


def listnet(s: torch.Tensor, b: Batch, temperature: float, weights: torch.Tensor | None = None) -> torch.Tensor:
    """ListNet cross-entropy of document scores ``s`` ``[Q, D]`` against the grades of ``b`` (padded documents
    left out), averaged over queries (``weights``: each query's share)."""
    logp = torch.log_softmax((temperature * s).masked_fill(~b.M, float("-inf")), dim=1)
    G = b.G * b.M
    target = G / G.sum(1, keepdim=True).clamp_min(1e-9)
    per_query = -torch.where(b.M, target * logp, torch.zeros_like(logp)).sum(1)
    return per_query.mean() if weights is None else (weights * per_query).sum() / weights.sum()
