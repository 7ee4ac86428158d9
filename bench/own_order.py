"""Each method served in its own order (issue #35 item 5): a router in the order its file records, against every
fixed method in the default (reversed) order, on the same queries of the collections kept aside.

    python bench/own_order.py --model smollm2-135m --router default heads fs multi

Stored passes only (``--no-compute`` semantics): a collection counts where both its reversed store and the
router's order's store exist; the queries are those of the smaller store. nDCG@10, paired t-test per collection
and pooled. Writes results/own-order-<model>.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from loco import first_stage, per_query  # noqa: E402

from routehead.evaluation.runs import sc_identity  # noqa: E402
from routehead.metrics import paired_p_value  # noqa: E402
from routehead.offline.job import ScoreJob  # noqa: E402
from routehead.selection import load_method  # noqa: E402
from routehead.settings import DEFAULT_ORDER  # noqa: E402

COLLECTIONS = ("scifact", "trec-dl19-passage", "cranfield", "cisi", "med", "adi")
FIXED = ("icr", "static", "core", "layers", "single")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--router", nargs="+", default=["default"],
                    help="router variants or files (default: the model's default router)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    scorer, out = None, {"model": args.model, "date": time.strftime("%Y-%m-%d %H:%M"), "routers": {}}
    stores: dict[tuple[str, str], object] = {}

    def store(c: str, order: str):
        nonlocal scorer
        if (c, order) not in stores:
            sc, scorer = ScoreJob(data=f"../shared/data/{c}", split="test", model=args.model, dtype="float32",
                                  progress=False).with_options(doc_order=order).run(compute=False, scorer=scorer)
            stores[(c, order)] = sc if sc.entries else None
        return stores[(c, order)]

    for name in args.router:
        pooled: dict[str, list[np.ndarray]] = {}
        res = {}
        for c in COLLECTIONS:
            rev = store(c, DEFAULT_ORDER)
            if rev is None:
                continue
            ident = sc_identity(rev, scorer)
            route = load_method("route", ident, router=None if name == "default" else name)
            own = route.serving_order or DEFAULT_ORDER
            mine = store(c, own)
            if mine is None:
                continue
            qids = sorted(set(mine.entries) & set(rev.entries))
            vals = {f"route ({own})": per_query(mine, route, scorer, qids)}
            for m in FIXED:
                vals[f"{m} ({DEFAULT_ORDER})"] = per_query(rev, load_method(m, ident), scorer, qids)
            vals["bm25"] = first_stage(rev, qids)
            for k, v in vals.items():
                pooled.setdefault(k, []).append(v)
            res[c] = summary(vals, len(qids))
            print(name, c, json.dumps(res[c]), flush=True)
        res["pooled"] = summary({k: np.concatenate(v) for k, v in pooled.items()},
                                sum(len(v) for v in next(iter(pooled.values()))))
        print(name, "pooled", json.dumps(res["pooled"]), flush=True)
        out["routers"][name] = res
    path = Path(f"results/own-order-{args.model}.json")
    path.write_text(json.dumps(out, indent=1) + "\n")
    return out


def summary(vals: dict[str, np.ndarray], n: int) -> dict:
    """Mean nDCG@10 of each method, and the router against each (difference, paired p)."""
    (rname, r), *_ = vals.items()
    return {"queries": n, "ndcg@10": {k: round(float(v.mean()), 4) for k, v in vals.items()},
            "vs": {k: {"delta": round(float(r.mean() - v.mean()), 4), "p": float(f"{paired_p_value(r, v):.3g}")}
                   for k, v in vals.items() if k != rname}}


if __name__ == "__main__":
    main()
