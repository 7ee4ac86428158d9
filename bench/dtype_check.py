"""Do a faster dtype's rankings equal float32's? The equivalence check of issue #33, over stored passes.

    python bench/dtype_check.py --dtype bfloat16                       # 6 collections, 60 test queries, 2 orders
    python bench/dtype_check.py --dtype bfloat16 --collections adi --max-queries 10    # a smoke run

For each collection and prompt order (reversed = serving, shuffled = content only), the first ``--max-queries``
test queries are scored into two stores, float32 and ``--dtype`` (stores are keyed by dtype, so they never mix,
and a rerun resumes), then ``icr``, ``static`` and ``route`` are ranked from both. Reported per method: nDCG@10
under each dtype, their difference, and the share of queries whose re-ranked top 10 is identical (same documents,
same order), and, to say how far apart the rankings are where they differ, the share with the same top-10 *set*,
the same top document, and the mean Kendall tau over all candidates. The check holds where every |difference|
<= 0.005 and every top-10-identical share >= 0.95 (``holds`` in the JSON).
Test queries are only compared across dtypes here, never used to choose anything.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
from pathlib import Path

import numpy as np
from scipy.stats import kendalltau

from routehead.evaluation.runs import evaluate, save_json
from routehead.metrics import evaluate_run
from routehead.offline.job import ScoreJob

COLLECTIONS = ("scifact", "trec-dl19-passage", "cranfield", "cisi", "med", "adi")
METHODS = ("icr", "static", "route")
ORDERS = ("reverse", "shuffle")


def top10(run: dict[str, dict[str, float]], qid: str) -> list[str]:
    return [d for d, _ in sorted(run[qid].items(), key=lambda x: -x[1])[:10]]


def check(data: str, order: str, model: str, dtype: str, max_queries: int) -> dict:
    """Both dtypes' runs of one collection and order, compared."""
    runs = {}
    for dt in ("float32", dtype):
        job = ScoreJob(data=data, split="test", model=model, dtype=dt, max_queries=max_queries,
                       progress=False).with_options(doc_order=order)
        sc, scorer = job.run()
        runs[dt] = evaluate(sc, METHODS, scorer)[0]
        qrels = sc.collection.qrels
    out = {}
    for m in METHODS:
        a, b = runs["float32"][m], runs[dtype][m]
        qids = sorted(set(a) & set(b))
        na = evaluate_run(qrels, a, ["ndcg@10"])["ndcg@10"]
        nb = evaluate_run(qrels, b, ["ndcg@10"])["ndcg@10"]
        n = max(len(qids), 1)
        same = sum(top10(a, q) == top10(b, q) for q in qids) / n
        same_set = sum(set(top10(a, q)) == set(top10(b, q)) for q in qids) / n
        same_top1 = sum(top10(a, q)[:1] == top10(b, q)[:1] for q in qids) / n
        taus = [kendalltau([a[q][d] for d in a[q]], [b[q][d] for d in a[q]])[0] for q in qids]
        out[m] = {"ndcg10_float32": na, f"ndcg10_{dtype}": nb, "diff": nb - na, "top10_identical": same,
                  "top10_same_set": same_set, "top1_identical": same_top1,
                  "kendall_tau_mean": float(np.nanmean(taus)) if taus else None, "queries": len(qids)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data-root", default="../shared/data")
    ap.add_argument("--collections", nargs="+", default=list(COLLECTIONS))
    ap.add_argument("--orders", nargs="+", default=list(ORDERS))
    ap.add_argument("--max-queries", type=int, default=60)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    rows = {}
    for name in args.collections:
        for order in args.orders:
            rows[f"{name}/{order}"] = check(str(Path(args.data_root) / name), order, args.model, args.dtype,
                                            args.max_queries)
            print(name, order, json.dumps(rows[f"{name}/{order}"]), flush=True)
    holds = all(abs(r["diff"]) <= 0.005 and r["top10_identical"] >= 0.95 for row in rows.values() for r in row.values())
    out = {"config": {**vars(args), "date": datetime.date.today().isoformat(), "machine": platform.processor()
                      or platform.machine()}, "rows": rows, "holds": holds}
    save_json(out, args.out or f"results/dtype-check-{args.model}-{args.dtype}.json")
    print("holds" if holds else "does not hold")


if __name__ == "__main__":
    main()
