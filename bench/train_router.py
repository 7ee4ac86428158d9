"""Detect the static heads and train the shipped router on scifact train; choose every setting on dev.

    python bench/train_router.py [--model smollm2-135m] [--folds 5] [--ship]

Uses only scifact *train* queries already in the head-score store (bench/collect_scores.py fills it). Routers are
chosen by out-of-fold nDCG@10 of K-fold cross-fitted routers (--folds); the static heads on a dev split
carved from them (20%, seeded). Writes results/router-grid-<model>.json with every configuration's dev nDCG@10,
and with --ship copies into src/routehead/assets/ the static head set and the best router of each variant:
``router-<model>.safetensors`` (listwise, heads only: the default), ``-fs`` (listwise, may also route the
first-stage score) and ``-bce`` (the paper's recipe: BCE on greedy pseudo labels).
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path

import numpy as np
import torch

from routehead.collect import score_collection
from routehead.data import load_collection, split_dev
from routehead.evaluate import detect_heads, queries_for
from routehead.heads import ndcg_at_k, save_heads
from routehead.labels import quality
from routehead.model import load_model
from routehead.scorer import HeadScorer
from routehead.train import TrainSettings, fit_router

ASSETS = Path(__file__).resolve().parents[1] / "src" / "routehead" / "assets"


def static_dev(sc, heads, norm, dev_ids):
    qs = queries_for(sc, norm, False, dev_ids)
    L, H = sc.entries[dev_ids[0]].calibrated.shape[:2]
    idx = [a * H + b for a, b in heads]
    return float(np.mean([ndcg_at_k(q.signals[idx].sum(0), q.gains, q.ideal) for q in qs]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data", default="../shared/data/scifact")
    ap.add_argument("--max-doc-tokens", type=int, default=160)
    ap.add_argument("--ship", action="store_true")
    ap.add_argument("--quick", action="store_true", help="a smaller grid")
    ap.add_argument("--folds", type=int, default=5, help="K-fold cross-fitted routers (1: one 80/20 dev split)")
    args = ap.parse_args()
    torch.set_num_threads(1)  # tiny tensors: extra threads only contend with other jobs
    lm = load_model(args.model)
    scorer = HeadScorer(lm, max_doc_tokens=args.max_doc_tokens)
    coll = load_collection(args.data, "train")
    sc = score_collection(coll, None, scorer.settings(), top_k=20)
    ids = sorted(sc.entries)
    tr_ids, dev_ids = split_dev(ids, dev_fraction=0.2, seed=0)
    print(f"{len(ids)} stored train queries: {len(tr_ids)} train, {len(dev_ids)} dev")

    # Static heads (QRHead-style): detected on the train part; top-k and aggregation chosen on dev.
    static = []
    for top, norm in itertools.product([1, 2, 4, 8, 16], ["sum", "z"]):
        heads, qual = detect_heads(sc, top, tr_ids)
        static.append({"top": top, "norm": norm, "dev_ndcg@10": static_dev(sc, heads, norm, dev_ids),
                       "heads": [list(h) for h in heads]})
    best16 = max((s for s in static if s["top"] == 16), key=lambda s: s["dev_ndcg@10"])
    for s in static:
        print(f"static top-{s['top']:2d} {s['norm']:3s}: dev nDCG@10 {s['dev_ndcg@10']:.4f}")
    prior = quality(queries_for(sc, "z", False, tr_ids))

    grid = []
    layers = [8, 15] if not args.quick else [8]
    configs = []
    for layer, fs, pool, lr in itertools.product(layers, [False, True], [None, 32], [3e-3, 1e-2]):
        configs.append(dict(objective="listwise", embed_layer=layer, use_first_stage=fs, pool_size=pool, lr=lr,
                            sparsity=0.0, label_max_heads=4))
    for layer, sparsity, fs in itertools.product(layers, [0.0, 0.05], [False]):  # the paper's recipe
        configs.append(dict(objective="bce", embed_layer=layer, use_first_stage=fs, pool_size=None, lr=3e-3,
                            sparsity=sparsity, label_max_heads=4))
    for c in configs:
        t = time.time()
        settings = TrainSettings(objective=c["objective"], lr=c["lr"], sparsity=c["sparsity"])
        router, info = fit_router(sc, scorer, embed_layer=c["embed_layer"], norm="z",
                                  use_first_stage=c["use_first_stage"], max_heads=c["label_max_heads"],
                                  pool_size=c["pool_size"], folds=args.folds, settings=settings)
        tr = router.config.training
        row = {**c, "dev_ndcg@10": tr["dev_ndcg@10"], "threshold": router.config.threshold,
               **{k: tr[k] for k in ("best_epoch", "mean_label_size", "routed_oof", "fold_dev_ndcg@10") if k in tr},
               "seconds": round(time.time() - t, 1)}
        grid.append((row, router))
        print(json.dumps(row), flush=True)

    def best(objective, fs):
        return max((g for g in grid if g[0]["objective"] == objective and g[0]["use_first_stage"] == fs),
                   key=lambda g: g[0]["dev_ndcg@10"])
    chosen = {"route": best("listwise", False), "route+fs": best("listwise", True), "route-bce": best("bce", False)}
    out = {"model": lm.name, "train_queries": len(tr_ids), "dev_queries": len(dev_ids), "static": static,
           "static16_choice": {k: best16[k] for k in ("norm", "dev_ndcg@10")},
           "prior_best_head": [int(np.argmax(prior)) // lm.num_heads, int(np.argmax(prior)) % lm.num_heads],
           "single_dev_ndcg@10": next(s["dev_ndcg@10"] for s in static if s["top"] == 1 and s["norm"] == "z"),
           "grid": [g[0] for g in grid], "chosen": {k: v[0] for k, v in chosen.items()}}
    Path("results").mkdir(exist_ok=True)
    Path(f"results/router-grid-{lm.name}.json").write_text(json.dumps(out, indent=1))
    for k, v in chosen.items():
        print(k, json.dumps(v[0]))
    if args.ship:
        ASSETS.mkdir(parents=True, exist_ok=True)
        suffix = {"route": "", "route+fs": "-fs", "route-bce": "-bce"}
        for k, (_, router) in chosen.items():
            router.save(ASSETS / f"router-{lm.name}{suffix[k]}.safetensors")
        heads16 = [tuple(h) for h in best16["heads"]]
        save_heads(ASSETS / f"heads-{lm.name}.json", heads16, lm.identity(), norm=best16["norm"],
                   max_doc_tokens=args.max_doc_tokens, detected_on=f"scifact/train ({len(tr_ids)} queries)",
                   chosen_on=f"scifact/train dev split ({len(dev_ids)} queries)")
        print("shipped to", ASSETS)


if __name__ == "__main__":
    main()
