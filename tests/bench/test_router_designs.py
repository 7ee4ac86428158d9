"""bench/router_designs.py's learned pieces on data where the answer is known (no model, no store)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

_spec = importlib.util.spec_from_file_location("router_designs",
                                               Path(__file__).resolve().parents[2] / "bench" / "router_designs.py")
rd = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(rd)


def test_gate_learns_a_predictable_choice_and_falls_back_to_the_best_fixed():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(200, 6))
    # expert 1 wins by 0.2 where x0 > 0, expert 0 by 0.21 elsewhere: expert 0 is the best fixed one
    Y = np.where(X[:, :1] > 0, [[0.2, 0.4]], [[0.41, 0.2]])
    choose, fixed = rd.gate_fit(X, Y, dim=6, alpha=1.0)
    assert fixed == 0
    Xt = rng.normal(size=(100, 6))
    want = np.where(Xt[:, 0] > 0, 1, 0)
    assert (choose(Xt) == want).mean() > 0.9
    # an embedding that carries nothing: the gate keeps the best fixed expert
    choose0, fixed0 = rd.gate_fit(X, np.tile([[0.2, 0.5]], (200, 1)), dim=6, alpha=1.0)
    assert fixed0 == 1 and (choose0(Xt) == 1).all()


def test_separability_of_two_clouds():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(60, 5)), rng.normal(size=(40, 5)) + 5.0
    far = rd.separability(a, b)
    assert far["domain_balanced_accuracy"] == 1.0 and far["cos_between"] < 0 < far["cos_within_test"]
    same = rd.separability(a, rng.normal(size=(40, 5)))
    assert same["domain_balanced_accuracy"] < 0.75


def test_folds_cover_every_query_once():
    got = np.sort(np.concatenate([te for _, te in rd.folds(23, 5)]))
    assert got.tolist() == list(range(23))
    assert all(len(np.intersect1d(tr, te)) == 0 for tr, te in rd.folds(23, 5))


@pytest.mark.parametrize("alpha", [1.0, 1000.0])
def test_gate_is_deterministic(alpha):
    rng = np.random.default_rng(2)
    X, Y = rng.normal(size=(50, 4)), rng.uniform(size=(50, 3))
    a, _ = rd.gate_fit(X, Y, 3, alpha)
    b, _ = rd.gate_fit(X, Y, 3, alpha)
    assert (a(X) == b(X)).all()
