"""What routing inside the re-ranking pass saves: a router that reads the query in the prompt, routed in its own
pass, against the same router routed first (a separate pass up to its layer) and the shipped query-alone router.

    python bench/in_pass_routing.py --router src/routehead/assets/router-smollm2-135m.safetensors [--queries 6]

Per query (BM25's top 20 of scifact test, in the serving order), every mode re-ranks through ``Reranker.rerank``
(tokenization included), modes interleaved query by query so that a busy machine slows them alike; medians and
ratios to ``icr`` (all heads, one full pass) from the same run. ``layers`` is the decoder layers the run's passes
ran (all passes, counted by hooks), per query. Writes ``results/in-pass-routing-<model>.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from routehead.api import Reranker
from routehead.engine.model import load_model
from routehead.offline.bm25 import first_stage
from routehead.offline.data import load_collection


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--router", required=True, help="a router with prompt-* pooling")
    ap.add_argument("--baseline-router", default="fs", help="a query-alone router for comparison (default fs)")
    ap.add_argument("--data", default="../shared/data/scifact")
    ap.add_argument("--queries", type=int, default=6)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    lm = load_model(args.model)
    coll = load_collection(args.data, "test")
    qids = list(coll.queries)[:args.queries]
    cands = first_stage(coll, 20)
    modes = {"icr": Reranker(lm, method="icr"), "route (query alone)": Reranker(lm, router=args.baseline_router),
             "route-prompt, routed first": Reranker(lm, router=args.router),
             "route-prompt, in the pass": Reranker(lm, router=args.router)}
    if modes["route-prompt, in the pass"].selector.pass_routing() is None:
        raise SystemExit(f"{args.router} reads the query alone: nothing to route inside the pass")
    modes["route-prompt, routed first"].selector.pass_routing = lambda: None  # the path before routing in the pass
    layers = modes["icr"].scorer.layers
    ran: list[int] = []
    hooks = [layer.register_forward_pre_hook(lambda m, a: ran.append(1)) for layer in layers]
    times: dict[str, list[float]] = {m: [] for m in modes}
    depth: dict[str, list[int]] = {m: [] for m in modes}
    same: list[bool] = []
    for qid in qids:
        docs = [coll.prompt_text(d) for d, _ in cands[qid][:20]]
        got = {}
        for name, rr in modes.items():
            ran.clear()
            t0 = time.perf_counter()
            got[name] = rr.rerank(coll.queries[qid], docs)
            times[name].append(time.perf_counter() - t0)
            depth[name].append(len(ran))
        a, b = got["route-prompt, routed first"], got["route-prompt, in the pass"]
        same.append(a.indices == b.indices and a.heads == b.heads)
        print(qid, {m: round(t[-1], 2) for m, t in times.items()}, {m: d[-1] for m, d in depth.items()}, flush=True)
    for h in hooks:
        h.remove()
    med = {m: statistics.median(t) for m, t in times.items()}
    out = {"model": args.model, "router": args.router, "baseline_router": args.baseline_router,
           "date": time.strftime("%Y-%m-%d %H:%M"), "threads": args.threads, "queries": len(qids),
           "num_layers": lm.num_layers, "median_s": med, "over_icr": {m: med[m] / med["icr"] for m in med},
           "layers_run_median": {m: statistics.median(d) for m, d in depth.items()},
           "same_ranking_and_heads": f"{sum(same)}/{len(same)}", "per_query_s": times, "layers_run": depth}
    path = Path(args.out or f"results/in-pass-routing-{Path(args.model).name}.json")
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps({k: out[k] for k in ("median_s", "over_icr", "layers_run_median", "same_ranking_and_heads")},
                     indent=1))
    return out


if __name__ == "__main__":
    main()
