"""Why the shipped router routes one set (issue #35, item 3): what each cross-fitted member routes, and the merge.

    python bench/fold_routing.py --model smollm2-135m --doc-order reverse --set max_layer=20 start=set
    python bench/fold_routing.py --model gemma3-270m --doc-order reverse --recipe /nonexistent \
        --set embed_layer=15 pooling=mean use_first_stage=true start=set

Fits the recipe (the shipped router's FitSettings, as bench/loco.py reads them, then ``--set``) on one stored
train split and keeps the K fold routers the fit merges. For each member and for the merged router: its starting
selection, its threshold, and on every training query its routing diversity (distinct sets, the most common
set's share, mean Jaccard distance) and how much its routing probabilities move with the query (the spread across
queries of each start signal's probability, and of the most query-dependent signal's). A member that routes its
starting set to every query has learned weights, not sets. Writes results/fold-routing-<model>-<order>.json.
"""

from __future__ import annotations

import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from routehead.evaluation.analysis import routing_diversity
from routehead.evaluation.runs import save_json
from routehead.offline.views import query_embeddings
from routehead.selection.route import selection_of
from routehead.selection.router import Router
from routehead.training.fit import fit_router

sys.path.insert(0, str(Path(__file__).parent))
from loco import train_store, train_store_parser  # noqa: E402  (the shipped recipe, read as the LOCO protocol reads it)


def describe(router: Router, emb: torch.Tensor, qids: list[str]) -> dict:
    """One router's starting selection, threshold, routing diversity and probability spread over ``emb``."""
    cfg = router.config
    pool = cfg.pool_heads
    probs = router.probabilities(emb)
    chosen = {q: selection_of(router.route_probs(p), pool) for q, p in zip(qids, probs)}
    spread = probs.std(0).numpy()
    start = [int(i) for i in cfg.training.get("start_signals", [])]
    name = [list(pool[i]) if i < len(pool) else "first stage" for i in range(cfg.num_signals)]
    top = int(np.argmax(spread))
    return {"threshold": cfg.threshold, "start": [name[i] for i in start],
            "start_probability_std": [round(float(spread[i]), 4) for i in start],
            "most_query_dependent": {"signal": name[top], "probability_std": round(float(spread[top]), 4)},
            **routing_diversity(chosen)}


def main(argv: list[str] | None = None) -> dict:
    args = train_store_parser(__doc__).parse_args(argv)
    sc, scorer, settings = train_store(args)
    merged, info = fit_router(sc, scorer, settings)
    members: list[Router] = info["members"]
    qids = sorted(sc.entries)
    emb_of = query_embeddings(sc, scorer, settings.embed_layer, settings.pooling, qids)
    emb = torch.cat([emb_of[q] for q in qids])
    res = {"command": "python bench/fold_routing.py " + " ".join(sys.argv[1:] if argv is None else argv),
           "date": time.strftime("%Y-%m-%d %H:%M"), "model": args.model, "store": f"{sc.collection.name}/{args.split}",
           "doc_order": args.doc_order, "queries": len(qids), "recipe": asdict(settings),
           "oof_ndcg@10": round(float(merged.config.training.get("oof_ndcg@10", float("nan"))), 4),
           "members": [describe(m, emb, qids) for m in members], "merged": describe(merged, emb, qids),
           "note": "routings on the training queries (in-sample for every member but its own fold: this asks what "
                   "the routers do, not how well)"}
    for i, m in enumerate(res["members"]):
        print("member", i, m, flush=True)
    print("merged", res["merged"])
    save_json(res, Path("results") / f"fold-routing-{Path(scorer.lm.name).name}-{args.doc_order}.json")
    return res


if __name__ == "__main__":
    main()
