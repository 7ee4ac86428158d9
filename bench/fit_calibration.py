"""Fit the shipped relevance calibrations (raw attention score -> probability of relevance) on scifact train.

    python bench/fit_calibration.py [--model smollm2-135m] [--order ORDER] [--ship] [--test adi med trec-dl19-passage]

For each method (route, static, icr, with the shipped router and heads), every stored scifact *train* query's
candidates get the method's raw score, aggregated from the stored token scores exactly as inference does; a
monotone logistic map of the raw score alone (so a threshold means the same for every query) is fitted on
the judgments (:mod:`routehead.calibration`). Its reliability (expected calibration error, Brier score,
bins) is then measured on the test stores given, which played no part in the fit. Train and test stores are in
``--order`` (default: the serving default, :data:`routehead.settings.DEFAULT_ORDER`), and the calibration is keyed
by that order: scores from another prompt order have another scale, so they fall back to the uncalibrated map.
Writes results/calibration-<model>.json; --ship writes src/routehead/assets/calibration-<model>-<method>.json.
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
    ap.add_argument("--order", default=DEFAULT_ORDER, choices=["reverse", "input", "shuffle"],
                    help="prompt order of the train and test stores, and the calibration's key")
    ap.add_argument("--test", nargs="*", default=["adi", "med", "trec-dl19-passage"])
    ap.add_argument("--ship", action="store_true")
    args = ap.parse_args()
    lm = load_model(args.model)
    scorer = HeadScorer(lm)
    train = score_collection(load_collection(f"{args.data_root}/scifact", "train"), None, scorer.settings(),
                             doc_order=args.order)
    tests = {}
    for name in args.test:
        sc = score_collection(load_collection(f"{args.data_root}/{name}", "test"), None, scorer.settings(),
                              doc_order=args.order)
        if sc.entries:
            tests[name] = sc
    out = {"model": lm.name, "date": time.strftime("%Y-%m-%d"), "train_queries": len(train.entries),
           "order": args.order, "methods": {}}
    for method in ("route", "static", "icr"):  # registered methods, with the heads and router shipped for the model
        selector = load_method(method, lm.identity())
        raw, grp, grades = method_rows(train, scorer, selector)
        key = calibration_key({"model": lm.name, "method": method, "doc_order": args.order})
        cal = fit_calibration(raw, grp, grades, features=("raw",), key=key,
                              fitted_on=f"scifact/train, {len(train.entries)} queries, {args.order} order")
        row = {"coef": cal.coef, "intercept": cal.intercept, "train": cal.reliability, "test": {}}
        for name, sc in tests.items():
            r, g, y = method_rows(sc, scorer, selector)
            prob = np.concatenate([cal.relevance(r[g == k]) for k in np.unique(g)])
            row["test"][name] = {"queries": len(sc.entries), **reliability(prob, (y >= 1).astype(float))}
        cal.extra = {"test_reliability": {k: {m: v[m] for m in ("ece", "brier") if m in v}
                                          for k, v in row["test"].items()}}
        out["methods"][method] = row
        print(method, json.dumps({k: row[k] for k in ("coef", "intercept")}),
              {k: round(v.get("ece", float("nan")), 4) for k, v in row["test"].items()}, flush=True)
        if args.ship:
            cal.save(ASSETS / f"calibration-{lm.name}-{method}.json")
    Path("results").mkdir(exist_ok=True)
    Path(f"results/calibration-{lm.name}.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
