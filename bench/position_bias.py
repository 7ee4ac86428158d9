"""Position bias of attention re-rankers, measured three ways, and the debiased ``both`` order.

    python bench/position_bias.py [--model smollm2-135m] [--jobs scifact:test ...] [--identical 5]

1. Identical documents: one document repeated at every position of a 20-document prompt (``--identical`` queries
   of scifact test, each with its best BM25 candidate): an unbiased scorer gives every copy the same score.
   Reported per method: the spread of the copies' scores relative to their mean magnitude, and the Spearman
   correlation of score with position (+: favours late, near the query).
2. A list forward vs reversed: Kendall tau between the scores of the same candidates in the ``input`` and the
   ``reverse`` prompt (from the stores that bench/quality.py fills; no new forward pass). 1 = order-free.
3. Debiased (``doc_order="both"``): the mean of the ``input`` and ``reverse`` scores, its nDCG@10 beside each
   single order (same stores); it costs two forward passes per query.

Writes results/position-bias-<model>.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch
from scipy.stats import kendalltau, spearmanr

from routehead.engine.model import load_model
from routehead.engine.scorer import HeadScorer
from routehead.evaluation.runs import report, run_of
from routehead.evaluation.scores import method_scores
from routehead.offline.bm25 import first_stage
from routehead.offline.collect import score_collection
from routehead.offline.data import load_collection
from routehead.selection import load_method
from routehead.selection.base import Method

METHODS = ("icr", "static", "single", "route")  # registered methods, with the assets shipped for the model


def identical(scorer: HeadScorer, coll, qids: list[str], methods: dict[str, Method]) -> dict:
    out = {}
    sets = {k: m.select().heads for k, m in methods.items() if m.embedding is None}  # one head set each
    fs = first_stage(coll, 20)
    per: dict[str, list] = {k: [] for k in sets}
    for q in qids:
        doc = coll.prompt_text(fs[q][0][0])
        S = scorer.score(coll.queries[q], [doc] * 20, sets=list(sets.values()))
        for k, row in zip(sets, S.sets.double().numpy()):
            per[k].append(row)
    for k, rows in per.items():
        rows = np.array(rows)
        spread = [(r.max() - r.min()) / max(np.abs(r).mean(), 1e-12) for r in rows]
        rho = [spearmanr(r, np.arange(len(r))).statistic for r in rows]
        out[k] = {"relative_spread": float(np.median(spread)), "spearman_with_position": float(np.mean(rho)),
                  "scores_by_position_first_query": [round(float(x), 6) for x in rows[0]]}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data-root", default="../shared/data")
    ap.add_argument("--jobs", nargs="+", default=["scifact:test", "trec-dl19-passage:test", "cranfield:test",
                                                   "cisi:test", "med:test", "adi:test"])
    ap.add_argument("--identical", type=int, default=5, help="queries for the identical-documents probe (0: skip)")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    lm = load_model(args.model)
    scorer = HeadScorer(lm)
    methods = {m: load_method(m, lm.identity()) for m in METHODS}
    out: dict = {"model": lm.name, "machine": platform.processor() or platform.machine(),
                 "date": time.strftime("%Y-%m-%d"), "static_heads": methods["static"].info()["heads"]}
    if args.identical:
        coll = load_collection(f"{args.data_root}/scifact", "test")
        out["identical_documents"] = identical(scorer, coll, list(coll.queries)[: args.identical], methods)
        print(json.dumps(out["identical_documents"]), flush=True)
    out["collections"] = []
    for job in args.jobs:
        name, split = job.split(":")[:2]
        coll = load_collection(f"{args.data_root}/{name}", split)
        scs = {o: score_collection(coll, None, scorer.settings(), doc_order=o) for o in ("input", "reverse")}
        common = sorted(set(scs["input"].entries) & set(scs["reverse"].entries))
        if not common:
            continue
        row: dict = {"dataset": name, "n_queries": len(common), "kendall_tau_input_vs_reverse": {}, "ndcg@10": {}}
        for sc in scs.values():
            sc.entries = {q: sc.entries[q] for q in common}
            sc.first_stage = {q: c for q, c in sc.first_stage.items() if q in common}
        scores = {o: {m: method_scores(sc, method, scorer) for m, method in methods.items()} for o, sc in scs.items()}
        runs = {}
        for m in METHODS:
            taus = [kendalltau(scores["input"][m][q], scores["reverse"][m][q]).statistic for q in common]
            row["kendall_tau_input_vs_reverse"][m] = float(np.nanmean(taus))
            a, b = scores["input"][m], scores["reverse"][m]
            runs[f"{m}@input"] = run_of(scs["input"], a.__getitem__)
            runs[f"{m}@reverse"] = run_of(scs["reverse"], b.__getitem__)
            runs[f"{m}@both"] = run_of(scs["reverse"], lambda q, a=a, b=b: (a[q] + b[q]) / 2)
        rep = report(scs["reverse"], runs, baselines=[])
        row["ndcg@10"] = {k: round(v["metrics"]["ndcg@10"], 4) for k, v in rep["rerankers"].items()}
        out["collections"].append(row)
        print(json.dumps(row), flush=True)
    Path("results").mkdir(exist_ok=True)
    Path(f"results/position-bias-{lm.name}.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
