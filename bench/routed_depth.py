"""How deep a routed pass runs, per query: the shipped router's deepest routed layer over whole test collections.

    python bench/routed_depth.py [--model smollm2-135m] [--jobs scifact:test cranfield:test ...]

A routed pass stops inside the attention of the deepest routed layer (``capture``), so its cost is about
``layers run / all layers`` of an ICR pass over the same prompt (the short query-embedding pass aside).
``bench/speed.py`` times one query; this gives the distribution that one query is drawn from: only embedding
passes (seconds per collection), no re-ranking. Writes ``results/routed-depth-<model>.json``.
"""

from __future__ import annotations

import argparse
import collections
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from routehead.api import Reranker
from routehead.offline.data import load_collection

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--router", default=None, help="default: the router shipped for the model")
    ap.add_argument("--data-root", default=str(ROOT.parent / "shared" / "data"))
    ap.add_argument("--jobs", nargs="+", default=["scifact:test", "cranfield:test", "trec-dl19-passage:test",
                                                     "cisi:test", "med:test", "adi:test"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rr = Reranker(model=args.model, method="route", router=args.router)
    L = rr.lm.num_layers
    out: dict = {"model": rr.lm.name, "layers": L, "router": args.router or "shipped", **rr.info()["router"],
                 "machine": platform.node(), "date": time.strftime("%Y-%m-%d"), "by_collection": {}}
    for job in args.jobs:
        name, split = job.split(":")
        coll = load_collection(Path(args.data_root) / name, split)
        run = []
        for qid in sorted(coll.qrels):
            r = rr.route(coll.queries[qid])
            run.append(max((lay for lay, _ in r.heads), default=-1) + 1)  # first-stage score alone: no layer
        row = {"queries": len(run), "mean_layers_run": statistics.mean(run),
               "median_layers_run": statistics.median(run),
               "mean_fraction_of_layers": statistics.mean(run) / L,
               "layers_run_histogram": dict(sorted(collections.Counter(run).items()))}
        out["by_collection"][job] = row
        print(f"{job}: {row}", flush=True)
    path = Path(args.out) if args.out else ROOT / "results" / f"routed-depth-{args.model}.json"
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
