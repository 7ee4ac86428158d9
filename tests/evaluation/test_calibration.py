"""Calibration: a monotone map to [0, 1] fitted on judged triples, its JSON asset and its reliability."""

from __future__ import annotations

import json

import numpy as np
import pytest

from routehead.calibration import (
    Calibration,
    calibration_for,
    calibration_key,
    fallback,
    find_calibration,
    fit_calibration,
    list_features,
    reliability,
)


def synthetic(n_lists: int = 200, per_list: int = 10, seed: int = 0):
    """Lists whose relevance probability is a known logistic of the raw score, plus a per-list offset."""
    rng = np.random.default_rng(seed)
    raw, groups, grades = [], [], []
    for g in range(n_lists):
        s = rng.normal(rng.normal(0, 0.5), 1.0, per_list)
        p = 1 / (1 + np.exp(-(2.0 * s - 1.0)))
        raw.append(s)
        groups.append(np.full(per_list, g))
        grades.append((rng.random(per_list) < p).astype(float) * 2)  # grades 0 or 2
    return np.concatenate(raw), np.concatenate(groups), np.concatenate(grades)


def test_fit_recovers_the_logistic_and_is_reliable() -> None:
    raw, groups, grades = synthetic()
    cal = fit_calibration(raw, groups, grades, features=["raw"], key={"model": "m", "method": "route"})
    assert cal.calibrated and cal.features == ["raw"]
    assert cal.coef[0] == pytest.approx(2.0, rel=0.15) and cal.intercept == pytest.approx(-1.0, abs=0.2)
    assert cal.reliability["ece"] < 0.05
    test_raw, test_groups, test_grades = synthetic(seed=1)
    prob = np.concatenate([cal.relevance(test_raw[test_groups == g]) for g in np.unique(test_groups)])
    rel = reliability(prob, test_grades >= 1)
    assert rel["ece"] < 0.05 and sum(b["count"] for b in rel["bins"]) == rel["n"] == test_raw.size


@pytest.mark.parametrize("features", [["raw"], ["raw", "z"], ["raw", "z", "rank"]])
def test_map_is_monotone_within_a_list_and_in_unit_interval(features: list[str]) -> None:
    raw, groups, grades = synthetic(n_lists=80)
    cal = fit_calibration(raw, groups, grades, features=features)
    assert all(c >= 0 for c in cal.coef)
    for s in (np.array([3.0, 1.0, 1.0, -2.0]), np.array([0.5]), np.linspace(-50, 50, 7)):
        p = cal.relevance(s)
        assert np.all((p >= 0) & (p <= 1))
        order = np.argsort(-s, kind="stable")
        assert np.all(np.diff(p[order]) <= 1e-12), "calibration must never reorder a list"


def test_a_feature_that_wants_a_negative_weight_is_dropped() -> None:
    rng = np.random.default_rng(3)
    raw = rng.normal(size=2000)
    groups = np.arange(2000) // 10
    # relevance rises with raw but falls with the within-list z: z gets no (negative) weight
    z = np.concatenate([list_features(raw[groups == g], ["z"])[:, 0] for g in np.unique(groups)])
    grades = (rng.random(2000) < 1 / (1 + np.exp(-(3 * raw - 4 * z)))).astype(float)
    cal = fit_calibration(raw, groups, grades, features=["raw", "z"])
    assert "z" not in cal.features and all(c >= 0 for c in cal.coef)


def test_list_features() -> None:
    f = list_features([2.0, 5.0, 5.0, 1.0], ["raw", "z", "rank"])
    assert f[:, 0].tolist() == [2.0, 5.0, 5.0, 1.0]
    assert f[1, 2] == f[2, 2] == 0.0 and f[0, 2] == pytest.approx(-np.log(3))  # ties share the better rank
    assert list_features([7.0], ["z"])[0, 0] == 0.0
    with pytest.raises(ValueError, match="unknown"):
        list_features([1.0], ["minmax"])


def test_asset_round_trip_and_matching(tmp_path) -> None:
    raw, groups, grades = synthetic(n_lists=50)
    info = {"model": "smollm2-135m", "method": "route", "doc_order": "reverse"}
    cal = fit_calibration(raw, groups, grades, key=calibration_key(info), fitted_on="synthetic")
    path = cal.save(tmp_path / "calibration-smollm2-135m-route.json")
    loaded = Calibration.load(path)
    assert loaded == cal
    np.testing.assert_allclose(loaded.relevance([1.0, 0.0]), cal.relevance([1.0, 0.0]))
    assert loaded.matches(info)
    assert not loaded.matches({**info, "doc_order": "input"})
    assert not loaded.matches({"model": "smollm2-135m", "method": "route"})  # a setting it cannot check
    assert not loaded.matches({**info, "method": "icr"})
    assert find_calibration(info, tmp_path) == cal
    assert find_calibration({**info, "model": "other"}, tmp_path) is None
    body = json.loads(path.read_text())
    body["coef"] = [-1.0]
    (tmp_path / "calibration-bad.json").write_text(json.dumps(body))
    with pytest.raises(ValueError, match=">= 0"):
        Calibration.load(tmp_path / "calibration-bad.json")


def test_fallback_is_flagged_and_monotone(tmp_path) -> None:
    cal = calibration_for({"model": "x", "method": "icr"}, tmp_path)
    assert not cal.calibrated and "fallback" in cal.extra["note"]
    assert cal.relevance([0.0])[0] == 0.5
    assert cal.relevance([1.0])[0] == pytest.approx(1 / (1 + np.exp(-1)))
    assert fallback(scale=2.0).relevance([2.0])[0] == pytest.approx(1 / (1 + np.exp(-1)))
    # no per-list normalisation: a single document keeps its score's meaning
    assert cal.relevance([3.0])[0] == cal.relevance([3.0, -10.0])[0]


def test_fit_input_checks() -> None:
    with pytest.raises(ValueError, match="both"):
        fit_calibration([1.0, 2.0], [0, 0], [0, 0])
    with pytest.raises(ValueError, match="one length"):
        fit_calibration([1.0], [0, 0], [0, 1])


def test_a_route_calibration_serves_only_its_own_router(tmp_path) -> None:
    """A calibration fitted on one router's scores is keyed by that router's fingerprint: another router's scores
    (another scale) get the flagged fallback, never a wrong map."""
    raw, groups, grades = synthetic(n_lists=50)
    router = {"embed_layer": 8, "threshold": 0.5, "max_heads": 4, "pool": 64, "fingerprint": "aaaa"}
    info = {"model": "m", "method": "route", "doc_order": "input", "router": router}
    cal = fit_calibration(raw, groups, grades, key=calibration_key(info))
    cal.save(tmp_path / "calibration-m-route.json")
    assert cal.key["settings"] == {"doc_order": "input", "router": router}
    assert find_calibration(info, tmp_path) == cal
    other = {**info, "router": {**router, "fingerprint": "bbbb"}}
    assert find_calibration(other, tmp_path) is None and not calibration_for(other, tmp_path).calibrated


@pytest.mark.parametrize("variant", [None, "heads", "input"])
def test_shipped_route_calibrations_match_the_shipped_routers(variant) -> None:
    """Each shipped route calibration names the fingerprint and serving order of a shipped router, so the
    default router and its variants are each calibrated, in their own order."""
    from routehead.assets import router_path
    from routehead.calibration import calibration_paths
    from routehead.selection.route import Route
    from routehead.selection.router import load_router

    route = Route(load_router(router_path("smollm2-135m", variant)[0]))
    info = {"model": "smollm2-135m", "method": "route", "doc_order": route.serving_order, **route.info()}
    cal = find_calibration(info)
    assert cal is not None and cal.calibrated and str(route.serving_order) in cal.fitted_on
    keyed = [Calibration.load(p).key for p in calibration_paths() if "-route" in p.name]
    assert all("router" in k["settings"] for k in keyed if k["model"] == "smollm2-135m")


def test_the_static_calibration_serves_only_its_own_head_set() -> None:
    """The shipped static calibration is keyed by the shipped head set: the same method over other heads (a
    user's ``heads=``) has other scores, so it gets the flagged fallback."""
    from routehead.selection import load_method

    ident = {"model": "smollm2-135m", "architecture": "LlamaForCausalLM", "num_layers": 30, "num_heads": 9,
             "num_kv_heads": 3, "hidden_size": 576}
    static = load_method("static", ident)
    info = {"model": "smollm2-135m", "method": "static", "doc_order": "reverse", **static.info()}
    assert find_calibration(info) is not None
    assert find_calibration({**info, "heads": [[17, 3], [7, 7]]}) is None
