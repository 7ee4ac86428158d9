"""The learned linear combination of heads: the baseline a router must beat beside the strongest static selection
(issue #35). One signed weight per pool head, and one for the first stage, the same for every query.

Why a baseline of its own: a router that gives every query the same weighted heads is a static set, so what
routing adds is measured against the best fixed weighting fitted on the same queries, not only against published
head sets. It is fitted listwise (ListNet) through inference's own aggregation: the weighted token sum, the
outlier mask per document, the sum over the document's tokens, the scores standardised over the candidates and the
z-scored first stage added with its weight (:func:`routehead.engine.aggregate.combine`). So the fitted weights,
served as a :class:`~routehead.selection.base.Selection`, rank exactly as they were trained
(tests/training/test_linear.py). The weights start at (and are pulled towards, ``l2``) a static set's equal
weights, so with little data the fit stays near a published selection.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from routehead.engine.aggregate import Head, HeadSet
from routehead.metrics import ndcg_at_k
from routehead.offline.views import Query, queries_for
from routehead.selection.base import Method, Selection
from routehead.training.detect import detect_heads
from routehead.training.fit import balance_collections
from routehead.training.objectives import Batch, document_sums, listnet, padded


class FixedSelection(Method):
    """One selection for every query (a fitted baseline, not a shipped method: it is not in the registry)."""

    name = "linear"

    def __init__(self, selection: Selection) -> None:
        super().__init__()
        self.selection = selection

    def select(self, embedding: torch.Tensor | None = None) -> Selection:
        return self.selection


def linear_scores(theta: torch.Tensor, b: Batch, use_first_stage: bool) -> torch.Tensor:
    """Document scores ``[Q, D]`` of the weights ``theta`` (one per pool head, then the first stage's when used),
    aggregated as inference aggregates them: weighted token sum, outlier mask (no gradient through which tokens
    pass it), sum; then standardised over each query's candidates (population std, as ``zscore``) and the z-scored
    first stage added with its weight. Without the first stage the standardisation is only a per-query affine map
    (the ranking is inference's)."""
    n = b.X.shape[1]
    s = document_sums(torch.einsum("n,qnt->qt", theta[:n], b.X), b)
    m = b.M.to(s.dtype)
    cnt = m.sum(1, keepdim=True).clamp(min=1)
    mean = (s * m).sum(1, keepdim=True) / cnt
    sd = ((((s - mean) * m) ** 2).sum(1, keepdim=True) / cnt).sqrt()
    z = torch.where(sd > 0, (s - mean) / sd.clamp(min=1e-12), torch.zeros_like(s))
    if use_first_stage:
        z = z + theta[n] * b.F
    return z


def fit_linear(queries: list[Query], pool: Sequence[Head], start: Sequence[Head] = (), *,
               dev: list[Query] | None = None, temperatures: Sequence[float] = (1.0,), l2: float = 0.01,
               steps: int = 150, lr: float = 0.02, eval_every: int = 10) -> Selection:
    """Signed weights over ``pool`` (and the first stage when ``queries`` carry it), fitted on ``queries`` by
    full-batch Adam on the ListNet loss at each softmax temperature of ``temperatures`` (each query weighed by its
    ``weight``), starting at weight 1 on the heads of ``start`` found in the pool (0 elsewhere, the first stage
    included) with an ``l2`` pull towards that start.

    With ``dev`` queries, the weights kept are those with the best mean dev nDCG@10 over every temperature and
    every ``eval_every`` steps, the start included: ListNet's optimum is not nDCG's (a high temperature trades the
    top of the ranking for the worst-ranked relevant documents), so the fit never keeps a weighting that ranks the
    dev queries worse than its start. Without ``dev``, the last step of the first temperature. Returns the
    selection: every head with a non-zero weight, and the first stage's weight."""
    use_fs = queries[0].first_stage is not None
    b = padded(queries)
    bd = padded(dev) if dev else None
    chosen = {tuple(h) for h in start}
    theta0 = torch.tensor([1.0 if tuple(h) in chosen else 0.0 for h in pool] + ([0.0] if use_fs else []))
    if not chosen & {tuple(h) for h in pool}:
        theta0[0] = 1.0  # nothing of the start in the pool: the pool's first (best) head
    w = torch.tensor([q.weight for q in queries], dtype=torch.float32)

    def dev_ndcg(theta: torch.Tensor) -> float:
        with torch.no_grad():
            z = linear_scores(theta, bd, use_fs).double().numpy()
        return float(np.mean([ndcg_at_k(z[i, :len(q.gains)], q.gains, q.ideal, 10) for i, q in enumerate(dev)]))

    best = (dev_ndcg(theta0), theta0.clone()) if dev else None
    last = theta0
    for temperature in temperatures if dev else temperatures[:1]:
        theta = torch.nn.Parameter(theta0.clone())
        opt = torch.optim.Adam([theta], lr=lr)
        for step in range(1, steps + 1):
            loss = listnet(linear_scores(theta, b, use_fs), b, temperature, w) + l2 * ((theta - theta0) ** 2).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
            if best is not None and step % eval_every == 0:
                v = dev_ndcg(theta.detach())
                if v > best[0]:
                    best = (v, theta.detach().clone())
        last = theta.detach()
    t = (best[1] if best is not None else last).numpy().astype(np.float64)
    heads = [(tuple(h), float(x)) for h, x in zip(pool, t[:len(pool)]) if x != 0.0]
    return Selection(HeadSet.of([h for h, _ in heads], [x for _, x in heads]), float(t[len(pool)]) if use_fs else 0.0)


def fit_linear_on(sc: Any, pool_size: int = 64, start: Sequence[Head] | None = None, start_size: int = 16,
                  use_first_stage: bool = False, max_layer: int | None = None, balance: bool = False,
                  qids: Sequence[str] | None = None, dev_fraction: float = 0.2,
                  temperatures: Sequence[float] = (0.5, 1.0, 2.0, 4.0), seed: int = 0, **kw: Any) -> Selection:
    """:func:`fit_linear` on a stored collection (or merged view): the pool is the ``pool_size`` heads best alone
    on its queries (QRHead detection, layers ``<= max_layer``), the start ``start`` or else the pool's
    ``start_size`` best (the QRHead set of these queries); ``balance`` weighs a merged view's collections equally,
    as the router's option does. A random ``dev_fraction`` of the queries (``seed``) chooses the temperature and the
    step (:func:`fit_linear`'s ``dev``); the rest train."""
    pool, _ = detect_heads(sc, top=pool_size, qids=qids, max_layer=max_layer)
    queries = queries_for(sc, pool, use_first_stage, qids)
    if balance:
        balance_collections(sc, queries)
    order = np.random.default_rng(seed).permutation(len(queries))
    n_dev = int(round(dev_fraction * len(queries))) if len(queries) > 1 else 0
    dev = [queries[i] for i in order[:n_dev]]
    train = [queries[i] for i in order[n_dev:]]
    return fit_linear(train, pool, pool[:start_size] if start is None else start, dev=dev or None,
                      temperatures=temperatures, **kw)
