"""Fit the shipped relevance calibrations (raw attention score -> probability of relevance) on scifact train.

    python bench/fit_calibration.py [--model smollm2-135m] [--order ORDER] [--methods route static icr]
        [--routers heads] [--ship] [--test adi med trec-dl19-passage]

For each method (route with the default router and with each shipped variant in --routers, static, icr), every
stored scifact *train* query's
candidates get the method's raw score, aggregated from the stored token scores exactly as inference does; a
monotone logistic map of the raw score alone (so a threshold means the same for every query) is fitted on
the judgments (:mod:`routehead.calibration`). Its reliability (expected calibration error, Brier score,
bins) is then measured on the test stores given, which played no part in the fit. Train and test stores are in
the method's own serving order (``--order`` forces one), and the calibration is keyed by that order and, for a
router, by its fingerprint (:func:`routehead.calibration.calibration_key`): scores from another prompt order or
another router have another scale, so they fall back to the uncalibrated map.
Writes results/calibration-<model>.json; --ship writes src/routehead/assets/calibration-<model>-<method>[-<variant>]
.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from routehead.calibration import calibration_key, fit_calibration, reliability
from routehead.engine.model import load_model
from routehead.engine.scorer import HeadScorer
from routehead.evaluation.scores import method_scores
from routehead.offline.collect import score_collection
from routehead.offline.data import load_collection
from routehead.offline.views import gains
from routehead.selection import load_method
from routehead.selection.base import Method
from routehead.settings import DEFAULT_ORDER

ASSETS = Path(__file__).resolve().parents[1] / "src" / "routehead" / "assets"


def method_rows(sc, scorer, method: Method) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(raw scores, query index, grades) of every judged-or-not candidate of every stored query."""
    scores = method_scores(sc, method, scorer)
    raw, grp, grades = [], [], []
    for i, q in enumerate(sorted(sc.entries)):
        g, _ = gains(sc, q, sc.entries[q].doc_ids)
        raw.append(scores[q])
        grp.append(np.full(len(scores[q]), i))
        grades.append(g)
    return np.concatenate(raw), np.concatenate(grp), np.concatenate(grades)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data-root", default="../shared/data")
    ap.add_argument("--order", default=None, choices=["reverse", "input", "shuffle"],
                    help="prompt order of the train and test stores, and the calibration's key (default: each "
                         "method's own serving order)")
    ap.add_argument("--methods", nargs="*", default=["route", "static", "icr"])
    ap.add_argument("--routers", nargs="*", default=["heads"],
                    help="shipped router variants calibrated beside the default router")
    ap.add_argument("--test", nargs="*", default=["adi", "med", "trec-dl19-passage"])
    ap.add_argument("--ship", action="store_true")
    args = ap.parse_args()
    lm = load_model(args.model)
    scorer = HeadScorer(lm)
    stores: dict[tuple[str, str, str], object] = {}  # (collection, split, order): scifact has train and test

    def store(name: str, split: str, order: str):
        if (name, split, order) not in stores:
            stores[name, split, order] = score_collection(load_collection(f"{args.data_root}/{name}", split), None,
                                                   scorer.settings(), doc_order=order)
        return stores[name, split, order]

    out = {"model": lm.name, "date": time.strftime("%Y-%m-%d"), "methods": {}}
    runs = [(m, None) for m in args.methods] + [("route", v) for v in args.routers]
    for method, variant in runs:  # registered methods, with the heads and routers shipped for the model
        selector = load_method(method, lm.identity(), variant)
        order = args.order or selector.serving_order or DEFAULT_ORDER
        train = store("scifact", "train", order)
        raw, grp, grades = method_rows(train, scorer, selector)
        key = calibration_key({"model": lm.name, "method": method, "doc_order": order, **selector.info()})
        cal = fit_calibration(raw, grp, grades, features=("raw",), key=key,
                              fitted_on=f"scifact/train, {len(train.entries)} queries, {order} order")
        row = {"order": order, "train_queries": len(train.entries), "coef": cal.coef, "intercept": cal.intercept,
               "train": cal.reliability, "test": {}}
        for name in args.test:
            sc = store(name, "test", order)
            if not sc.entries:
                continue
            r, g, y = method_rows(sc, scorer, selector)
            prob = np.concatenate([cal.relevance(r[g == k]) for k in np.unique(g)])
            row["test"][name] = {"queries": len(sc.entries), **reliability(prob, (y >= 1).astype(float))}
        cal.extra = {"test_reliability": {k: {m: v[m] for m in ("ece", "brier") if m in v}
                                          for k, v in row["test"].items()}}
        label = method if variant is None else f"{method}-{variant}"
        out["methods"][label] = row
        print(label, order, len(train.entries), json.dumps({k: row[k] for k in ("coef", "intercept")}),
              {k: round(v.get("ece", float("nan")), 4) for k, v in row["test"].items()}, flush=True)
        if args.ship:
            cal.save(ASSETS / f"calibration-{lm.name}-{label}.json")
    Path("results").mkdir(exist_ok=True)
    Path(f"results/calibration-{lm.name}.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
