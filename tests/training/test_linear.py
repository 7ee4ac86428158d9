"""The learned linear combination of heads (routehead.training.linear): it scores as inference aggregates, and it
learns signed weights."""

from __future__ import annotations

import numpy as np
import torch

from routehead.engine.aggregate import spans_of, zscore
from routehead.metrics import ndcg_at_k
from routehead.offline.views import Query, doc_scores
from routehead.training.linear import FixedSelection, fit_linear, linear_scores
from routehead.training.objectives import padded


def _query(signals, gains, qid="q", first_stage=None, seed=0):
    """A query whose head ``i`` gives each of document ``d``'s three tokens ``signals[i][d]`` plus its own small
    jitter (so no weighting, signed or not, makes a document constant)."""
    sig = np.asarray(signals, dtype=np.float64)
    n, D = sig.shape
    rows = np.repeat(sig, 3, axis=1) + 1e-2 * np.random.default_rng(seed).normal(size=(n, 3 * D))
    gains = np.asarray(gains, dtype=float)
    q = Query(qid, torch.tensor(rows, dtype=torch.float32), spans_of([3] * D), np.zeros((n, D)), gains,
              [g for g in gains if g > 0], first_stage)
    q.single = np.stack([doc_scores(q, [i]) for i in range(n)])
    return q


def _literal(q, weights, fs_weight=0.0):
    """Inference's scores of signed head weights, written out: each token the weighted sum of the heads' token
    scores; per document, tokens not above mean - 2 (unbiased) std dropped, the rest summed; standardised over
    the candidates; plus the first stage's weight times its z-score."""
    rows = q.rows.double().numpy()
    tok = (np.asarray(weights)[:, None] * rows).sum(0)
    docs = []
    for i in range(q.spans.idx.shape[0]):
        t = tok[q.spans.idx[i][q.spans.valid[i]].numpy()]
        docs.append(t[t > t.mean() - 2 * t.std(ddof=1)].sum())
    s = zscore(np.array(docs))
    return s + fs_weight * q.first_stage if fs_weight else s


def test_linear_scores_are_the_inference_aggregation():
    rng = np.random.default_rng(3)
    fs = zscore(rng.normal(size=5))
    q = _query(rng.normal(size=(3, 5)), [1, 0, 0, 1, 0], first_stage=fs)
    theta = torch.tensor([0.8, -0.5, 0.3, 0.7])
    got = linear_scores(theta, padded([q]), True)[0].detach().numpy()
    assert np.allclose(got, _literal(q, [0.8, -0.5, 0.3], 0.7), atol=1e-5)
    assert np.allclose(got, doc_scores(q, [0, 1, 2, 3], theta.numpy()), atol=1e-5)  # the package's own path
    plain = linear_scores(theta[:3], padded([q]), False)[0].detach().numpy()
    assert np.allclose(plain, _literal(q, [0.8, -0.5, 0.3]), atol=1e-5)


def test_fit_linear_learns_a_negative_weight_and_serves_what_it_learned():
    """Head 0 is noise, head 1 ranks the relevant document last on every query; starting from head 0 alone, the
    fit gives head 1 a negative weight and ranks every relevant document first."""
    rng = np.random.default_rng(0)
    queries = []
    for i in range(12):
        rel = int(rng.integers(5))
        good = rng.normal(size=5) * 0.2
        bad = rng.normal(size=5) * 0.2
        bad[rel] -= 3.0
        gains = np.zeros(5)
        gains[rel] = 1
        queries.append(_query([good, bad], gains, f"q{i}", zscore(rng.normal(size=5)), seed=i))
    pool = [(0, 0), (0, 1)]
    sel = fit_linear(queries, pool, start=[(0, 0)], steps=200, lr=0.05, l2=0.0)
    w = dict(zip(sel.heads.heads, sel.heads.weights))
    assert w[(0, 1)] < 0
    assert FixedSelection(sel).select() is sel

    def mean_ndcg(weights, fs_w):
        return np.mean([float(ndcg_at_k(_literal(q, weights, fs_w), q.gains, q.ideal, 10)) for q in queries])

    assert mean_ndcg(list(sel.heads.weights), sel.first_stage_weight) > mean_ndcg([1.0, 0.0], 0.0)
    assert mean_ndcg(list(sel.heads.weights), sel.first_stage_weight) == 1.0


def test_fit_linear_keeps_its_start_when_dev_queries_disagree():
    """Training queries where head 1 ranks the relevant document last, dev queries where it ranks it first: the
    fit learns a negative weight on training, which ranks dev worse, so the dev guard keeps the start."""
    rng = np.random.default_rng(1)

    def queries(sign, n, offset):
        out = []
        for i in range(n):
            rel = int(rng.integers(5))
            noise = rng.normal(size=5) * 0.2
            head1 = rng.normal(size=5) * 0.2
            head1[rel] += sign * 3.0
            gains = np.zeros(5)
            gains[rel] = 1
            out.append(_query([noise, head1], gains, f"q{offset + i}", seed=offset + i))
        return out

    train, dev = queries(-1.0, 12, 0), queries(+1.0, 6, 100)
    pool = [(0, 0), (0, 1)]
    free = fit_linear(train, pool, start=pool, steps=200, lr=0.05, l2=0.0, temperatures=(0.5, 1.0))
    assert dict(zip(free.heads.heads, free.heads.weights))[(0, 1)] < 1.0  # training alone moves it down
    kept = fit_linear(train, pool, start=pool, dev=dev, steps=200, lr=0.05, l2=0.0, temperatures=(0.5, 1.0))
    assert kept.heads.heads == ((0, 0), (0, 1)) and kept.heads.weights == (1.0, 1.0)
