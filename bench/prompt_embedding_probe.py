"""Does the router read the query better inside the re-ranking prompt (issue #35 item 3)? Out-of-fold on scifact
train, stored passes only.

    python bench/prompt_embedding_probe.py --model smollm2-135m [--recipe fs]

The same recipe (a shipped router's FitSettings, as bench/loco.py reads them) fitted twice on the stored shuffled
scifact train queries: with the query embedded alone (``pooling=mean``, the shipped routers) and embedded in the
re-ranking prompt, the candidates in front (``pooling=prompt-mean``, :meth:`HeadScorer.query_embedding`).
Per-query out-of-fold nDCG@10 of the two, paired. Writes results/prompt-embedding-<model>.json.
"""

from __future__ import annotations

import argparse
import datetime
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from loco import recipe  # noqa: E402

from routehead.evaluation.runs import save_json, sc_identity  # noqa: E402
from routehead.metrics import paired_p_value  # noqa: E402
from routehead.offline.job import ScoreJob  # noqa: E402
from routehead.training.fit import fit_router  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--recipe", default="fs", help="the shipped router variant whose recipe is fitted")
    ap.add_argument("--poolings", nargs="+", default=["mean", "prompt-mean"])
    args = ap.parse_args()
    sc, scorer = ScoreJob(data="../shared/data/scifact", split="train", model=args.model, dtype="float32",
                          progress=False).with_options(doc_order="shuffle").run(compute=False)
    base = recipe(args.recipe, args.model, sc_identity(sc, scorer), [])
    out = {"model": args.model, "date": datetime.date.today().isoformat(), "recipe": args.recipe,
           "train_queries": len(sc.entries), "runs": {}}
    vals = {}
    for pooling in args.poolings:
        router, info = fit_router(sc, scorer, replace(base, pooling=pooling))
        v = info["oof_ndcg@10"]
        vals[pooling] = np.array([v[q] for q in sorted(v)])
        out["runs"][pooling] = {"oof_ndcg@10": round(float(vals[pooling].mean()), 4),
                                "threshold": router.config.threshold,
                                "routed_oof": router.config.training.get("routed_oof"),
                                "layers_run_train": router.config.training.get("layers_run_train")}
        print(pooling, out["runs"][pooling], flush=True)
    a, b = args.poolings[:2]
    out["delta"] = round(float((vals[b] - vals[a]).mean()), 4)
    out["p"] = round(float(paired_p_value(vals[b], vals[a])), 4)
    print(f"{b} - {a}: {out['delta']:+.4f} (p = {out['p']})")
    save_json(out, Path(f"results/prompt-embedding-{args.model}.json"))


if __name__ == "__main__":
    main()
