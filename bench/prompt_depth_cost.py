"""Can SmolLM2's default (in-prompt) router be priced down to 0.7 of the layers? (issue #35 goal)

    python bench/prompt_depth_cost.py --depth-costs 0.03 0.1 0.15 0.2 0.3 0.6     # one process per D works too
    python bench/prompt_depth_cost.py --max-layers 20 17                           # a depth budget instead

Fits the shipped default router's recipe (the ``fs`` router's FitSettings, pooling ``prompt-mean``) with a
depth price D (``FitSettings.depth_cost``: D x the expected fraction of layers a routed pass runs, in nDCG@10) on
the stored shuffled scifact train queries, and records each fit's out-of-fold nDCG@10 and the merged router's
fraction of layers run on train. ``--max-layers L`` fits with a depth budget instead (``FitSettings.max_layer``:
only heads of layers up to L are routable, so every pass stops after layer L). The rule for a ``fast`` router
(bench/train_router.py) applies: the cheapest one within 0.01 of the unpriced recipe's out-of-fold nDCG@10 whose
passes run at most 0.7 of the layers. Results merge into ``results/prompt-depth-cost-<model>.json`` (one entry
per run, so separate processes can fill it).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from loco import recipe  # noqa: E402

from routehead.assets import router_path  # noqa: E402
from routehead.evaluation.runs import sc_identity  # noqa: E402
from routehead.offline.job import ScoreJob  # noqa: E402
from routehead.training.fit import fit_router  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--depth-costs", type=float, nargs="*", default=[])
    ap.add_argument("--max-layers", type=int, nargs="*", default=[])
    ap.add_argument("--save-dir", default=None, help="also save each fitted router here")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    sc, scorer = ScoreJob(data="../shared/data/scifact", split="train", model=args.model, dtype="float32",
                          progress=False).with_options(doc_order="shuffle").run(compute=False)
    ident = sc_identity(sc, scorer)
    fs_file = router_path(args.model, "fs")[0]
    out_path = Path(f"results/prompt-depth-cost-{args.model}.json")
    runs = [(str(d), "depth_cost", d) for d in args.depth_costs] + \
        [(f"max_layer={L}", "max_layer", L) for L in args.max_layers]
    for name, field, value in runs:
        settings = recipe(str(fs_file), args.model, ident, ["pooling=prompt-mean", f"{field}={value}"])
        router, _ = fit_router(sc, scorer, settings)
        if args.save_dir:
            router.save(Path(args.save_dir) / f"router-{args.model}-prompt-{field}{value}.safetensors")
        t = router.config.training
        row = {field: float(value),
               "oof_ndcg@10": round(float(t["dev_ndcg@10"]), 4),
               "layers_run_train": round(float(t.get("layers_run_train", t.get("dev_layers_run"))), 4),
               "train_queries": t["train_queries"], "date": time.strftime("%Y-%m-%d %H:%M")}
        res = json.loads(out_path.read_text()) if out_path.is_file() else {"model": args.model, "runs": {}}
        res["runs"][name] = row
        out_path.write_text(json.dumps(res, indent=1) + "\n")
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
