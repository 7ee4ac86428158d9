"""Where a listwise router starts (issue #35): the single head best alone, or the greedy set best together?

    python bench/start_choice.py --model smollm2-135m --doc-order reverse
    python bench/start_choice.py --model gemma3-270m --doc-order reverse --recipe /nonexistent \
        --set embed_layer=15 pooling=mean use_first_stage=true

A train-only choice: both routers are fitted on the same stored train split with the same recipe (the shipped
router's FitSettings, as bench/loco.py reads them, then ``--set``), differing only in ``start``; each gives every
training query one out-of-fold nDCG@10 (5 folds, the same folds for both), compared per query (paired t-test).
Also each one's mean signals routed and fraction of layers run. Writes results/start-choice-<model>-<order>.json.
"""

from __future__ import annotations

import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np

from routehead.evaluation.runs import save_json
from routehead.metrics import paired_p_value
from routehead.training.fit import fit_router

sys.path.insert(0, str(Path(__file__).parent))
from loco import train_store, train_store_parser  # noqa: E402  (the shipped recipe, read as the LOCO protocol reads it)


def main(argv: list[str] | None = None) -> dict:
    args = train_store_parser(__doc__).parse_args(argv)
    sc, scorer, base = train_store(args)
    fits, oof = {}, {}
    for start in ("single", "set"):
        t0 = time.time()
        router, info = fit_router(sc, scorer, replace(base, start=start))
        oof[start] = info["oof_ndcg@10"]
        tr = router.config.training
        fits[start] = {"oof_ndcg@10": round(float(np.mean(list(oof[start].values()))), 4),
                       "signals_routed": tr["routed_oof"], "layers_run": tr.get("layers_run_train"),
                       "start_signals": [router.config.pool[i] if i < len(router.config.pool) else "first stage"
                                         for i in tr.get("start_signals", [])],
                       "seconds": round(time.time() - t0, 1)}
        print(start, fits[start], flush=True)
    qids = sorted(oof["single"])
    a, b = (np.array([oof[s][q] for q in qids]) for s in ("set", "single"))
    res = {"command": "python bench/start_choice.py " + " ".join(sys.argv[1:] if argv is None else argv),
           "date": time.strftime("%Y-%m-%d %H:%M"), "model": args.model, "store": f"{sc.collection.name}/"
           f"{args.split}", "doc_order": args.doc_order, "queries": len(qids), "recipe": asdict(base),
           "fits": fits, "set_minus_single": round(float((a - b).mean()), 4), "p": float(paired_p_value(a, b))}
    print("set - single", res["set_minus_single"], "p", round(res["p"], 3))
    save_json(res, Path("results") / f"start-choice-{args.model}-{args.doc_order}.json")
    return res


if __name__ == "__main__":
    main()
