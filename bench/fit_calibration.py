"""Fit the shipped relevance calibrations (raw attention score -> probability of relevance) on scifact train.

    python bench/fit_calibration.py [--model smollm2-135m] [--order ORDER] [--ship] [--test adi med trec-dl19-passage]

For each method (route, static, icr, with the shipped router and heads), every stored scifact *train* query's
candidates get the method's raw score, aggregated from the stored token scores exactly as inference does; a
monotone logistic map of the raw score alone (so a threshold means the same for every query) is fitted on
the judgments (:mod:`routehead.calibration`). Its reliability (expected calibration error, Brier score,
bins) is then measured on the test stores given, which played no part in the fit. Train and test stores are in
``--order`` (default: the serving default, :data:`routehead.methods.DEFAULT_ORDER`), and the calibration is keyed
by that order: scores from another prompt order have another scale, so they fall back to the uncalibrated map.
Writes results/calibration-<model>.json; --ship writes src/routehead/assets/calibration-<model>-<method>.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from routehead.api import default_heads_path, default_router_path
from routehead.calibration import calibration_key, fit_calibration, reliability
from routehead.collect import score_collection
from routehead.data import load_collection
from routehead.evaluate import _gains, head_rows, icr_scores, queries_for, query_embeddings
from routehead.heads import load_heads, set_scores, spans_of
from routehead.labels import doc_scores
from routehead.methods import DEFAULT_ORDER
from routehead.model import load_model
from routehead.router import load_router
from routehead.scorer import HeadScorer

ASSETS = Path(__file__).resolve().parents[1] / "src" / "routehead" / "assets"


def method_rows(sc, scorer, method: str, heads, router) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(raw scores, query index, grades) of every judged-or-not candidate of every stored query."""
    if method == "route":
        emb = query_embeddings(sc, scorer, router.config.embed_layer, router.config.pooling)
        qs = {q.qid: q for q in queries_for(sc, router.config.pool_heads, False)}
    raw, grp, grades = [], [], []
    for i, q in enumerate(sorted(sc.entries)):
        e = sc.entries[q]
        if method == "icr":
            s = icr_scores(sc, q)
        elif method == "static":
            s = set_scores(head_rows(sc, q, heads), spans_of(e.tokens.counts))
        else:
            r = router.route(emb[q])
            s = doc_scores(qs[q], r.signals, r.signal_weights)
        g, _ = _gains(sc, q, e.doc_ids)
        raw.append(s)
        grp.append(np.full(len(s), i))
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
    heads, _ = load_heads(default_heads_path(lm.name), lm.identity())
    router = load_router(default_router_path(lm.name), lm.identity())
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
    for method in ("route", "static", "icr"):
        raw, grp, grades = method_rows(train, scorer, method, heads, router)
        key = calibration_key({"model": lm.name, "method": method, "doc_order": args.order})
        cal = fit_calibration(raw, grp, grades, features=("raw",), key=key,
                              fitted_on=f"scifact/train, {len(train.entries)} queries, {args.order} order")
        row = {"coef": cal.coef, "intercept": cal.intercept, "train": cal.reliability, "test": {}}
        for name, sc in tests.items():
            r, g, y = method_rows(sc, scorer, method, heads, router)
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
