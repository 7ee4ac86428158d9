"""Detect the static heads and train the shipped routers on scifact train; choose every setting on dev.

    python bench/train_router.py [--model smollm2-135m] [--folds 5] [--doc-order shuffle] [--ship]
                                 [--max-layers 15 19] [--out results/router-grid-<model>.json]

Uses only scifact *train* queries already in the head-score store (bench/collect_scores.py fills it). Routers are
chosen by out-of-fold nDCG@10 of K-fold cross-fitted routers (--folds); the static heads on a dev split
carved from them (20%, seeded). Writes results/router-grid-<model>.json with every configuration's dev nDCG@10,
and with --ship copies into src/routehead/assets/ the static head set and the best router of each variant:
``router-<model>.safetensors`` (listwise, heads only: the default), ``-fs`` (listwise, may also route the
first-stage score) and ``-bce`` (the paper's recipe: BCE on greedy pseudo labels). ``--max-layers L...`` adds
listwise routers with a depth budget (pool from layers <= L only; every routed pass can stop there), reported
beside the others and never shipped in their place. ``--depth-costs D...`` trains cost-aware copies of the chosen
listwise router (a price D, in nDCG@10, on the fraction of layers a routed pass runs); the cheapest one within
``--fast-tolerance`` of route's out-of-fold nDCG@10 whose passes run at most ``--fast-layers`` of the layers
(the merged router, over the training queries) ships as
``-fast`` beside the others (a rule fixed before any test figure of it existed). ICR is reported on the same
queries as the routers (``icr_all_ndcg@10``), so the comparison is like for like.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from routehead.engine.aggregate import HeadSet
from routehead.engine.model import load_model
from routehead.engine.scorer import HeadScorer
from routehead.metrics import ndcg_at_k, paired_p_value
from routehead.offline.collect import score_collection
from routehead.offline.data import load_collection, split_dev
from routehead.offline.views import gains, selection_scores
from routehead.selection.base import Selection
from routehead.selection.heads import save_heads
from routehead.settings import DEFAULT_MAX_DOC_TOKENS, FitSettings
from routehead.training.detect import detect_heads
from routehead.training.fit import fit_router

ASSETS = Path(__file__).resolve().parents[1] / "src" / "routehead" / "assets"


def static_dev(sc, heads, dev_ids):
    """Mean dev nDCG@10 of a head set (in detection order), aggregated as inference does (sum over heads, mask,
    sum)."""
    sel = Selection(HeadSet.of(heads))
    vals = []
    for q in dev_ids:
        g, ideal = gains(sc, q, sc.entries[q].doc_ids)
        vals.append(float(ndcg_at_k(selection_scores(sc, q, sel), g, ideal)))
    return float(np.mean(vals))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data", default="../shared/data/scifact")
    ap.add_argument("--max-doc-tokens", type=int, default=DEFAULT_MAX_DOC_TOKENS)
    ap.add_argument("--doc-order", default="shuffle", help="prompt order of the training store (shuffle: no "
                    "position head can win detection or labels by reading the first stage's order back)")
    ap.add_argument("--ship", action="store_true")
    ap.add_argument("--quick", action="store_true", help="a smaller grid")
    ap.add_argument("--folds", type=int, default=5, help="K-fold cross-fitted routers (1: one 80/20 dev split)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--max-layers", type=int, nargs="*", default=[],
                    help="also train listwise routers whose pool is limited to layers <= L (a depth budget)")
    ap.add_argument("--depth-costs", type=float, nargs="*", default=[],
                    help="also train listwise routers with this weight on the expected fraction of layers a routed "
                         "pass runs (cost-aware routing)")
    ap.add_argument("--fast-tolerance", type=float, default=0.01,
                    help="route-fast may lose at most this much out-of-fold nDCG@10 to route")
    ap.add_argument("--fast-layers", type=float, default=0.7,
                    help="route-fast must run at most this fraction of the layers (its merged router, over the "
                         "training queries)")
    ap.add_argument("--out", default=None, help="grid JSON (default results/router-grid-<model>.json)")
    ap.add_argument("--save-dir", default=None, help="also save every grid router here (e.g. for bench/speed.py "
                    "--router)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    lm = load_model(args.model)
    scorer = HeadScorer(lm, max_doc_tokens=args.max_doc_tokens)
    coll = load_collection(args.data, "train")
    sc = score_collection(coll, None, scorer.settings(), top_k=20, doc_order=args.doc_order)
    ids = sorted(sc.entries)
    tr_ids, dev_ids = split_dev(ids, dev_fraction=0.2, seed=0)
    print(f"{len(ids)} stored train queries ({args.doc_order} order): {len(tr_ids)} train, {len(dev_ids)} dev")

    # Static heads (QRHead): detected alone on the train part, summed then masked; dev nDCG@10 per size.
    static = []
    for top in [1, 2, 4, 8, 16, 32, 64]:
        heads, _ = detect_heads(sc, top, tr_ids)
        static.append({"top": top, "dev_ndcg@10": static_dev(sc, heads, dev_ids), "heads": [list(h) for h in heads]})
        print(f"static top-{top:2d}: dev nDCG@10 {static[-1]['dev_ndcg@10']:.4f}", flush=True)
    all_heads = [(a, b) for a in range(lm.num_layers) for b in range(lm.num_heads)]
    icr_dev, icr_all = static_dev(sc, all_heads, dev_ids), static_dev(sc, all_heads, ids)
    print(f"icr (all heads): dev nDCG@10 {icr_dev:.4f}, all {len(ids)} queries {icr_all:.4f}")
    best16 = next(s for s in static if s["top"] == 16)

    grid, oof = [], []  # oof[i]: grid row i's {qid: out-of-fold nDCG@10}
    configs = [dict(objective="listwise", embed_layer=8, use_first_stage=False, pool_size=32, lr=3e-3),
               dict(objective="listwise", embed_layer=8, use_first_stage=True, pool_size=32, lr=3e-3),
               dict(objective="bce", embed_layer=8, use_first_stage=False, pool_size=32, lr=3e-3)]
    if not args.quick:
        configs += [dict(objective="listwise", embed_layer=15, use_first_stage=False, pool_size=32, lr=3e-3),
                    dict(objective="listwise", embed_layer=8, use_first_stage=False, pool_size=64, lr=3e-3),
                    dict(objective="bce", embed_layer=15, use_first_stage=False, pool_size=32, lr=3e-3)]
    configs += [dict(objective="listwise", embed_layer=8, use_first_stage=False, pool_size=32, lr=3e-3, max_layer=m)
                for m in args.max_layers]

    def train(c):
        t = time.time()
        settings = FitSettings(objective=c["objective"], lr=c["lr"], depth_cost=c.get("depth_cost", 0.0),
                               embed_layer=c["embed_layer"], use_first_stage=c["use_first_stage"], label_max_heads=4,
                               pool_size=c["pool_size"], folds=args.folds, max_layer=c.get("max_layer"))
        router, info = fit_router(sc, scorer, settings)
        tr = router.config.training
        row = {**c, "dev_ndcg@10": tr["dev_ndcg@10"], "threshold": router.config.threshold,
               **{k: tr[k] for k in ("best_epoch", "mean_label_size", "routed_oof", "layers_run_train",
                                     "fold_dev_ndcg@10") if k in tr},
               "seconds": round(time.time() - t, 1)}
        oof.append(info["oof_ndcg@10"])
        grid.append((row, router))
        if args.save_dir:
            name = "-".join([c["objective"], f"e{c['embed_layer']}", f"p{c['pool_size']}"]
                            + (["fs"] if c["use_first_stage"] else [])
                            + ([f"L{c['max_layer']}"] if c.get("max_layer") is not None else [])
                            + ([f"d{c['depth_cost']:g}"] if c.get("depth_cost") else []))
            Path(args.save_dir).mkdir(parents=True, exist_ok=True)
            router.save(Path(args.save_dir) / f"{name}.safetensors")
        print(json.dumps(row), flush=True)

    for c in configs:
        train(c)

    def best(objective, fs):
        return max((g for g in grid if g[0]["objective"] == objective and g[0]["use_first_stage"] == fs
                    and g[0].get("max_layer") is None and not g[0].get("depth_cost")),
                   key=lambda g: g[0]["dev_ndcg@10"])
    chosen = {"route": best("listwise", False), "route+fs": best("listwise", True), "route-bce": best("bce", False)}
    # cost-aware variants of the chosen router: the same configuration, plus a price on the layers a pass runs.
    # route-fast (shipped beside route, never in its place): the cheapest whose out-of-fold nDCG@10 is within
    # --fast-tolerance of route's, if it runs at most --fast-layers of the layers (the speed goal); else none.
    # Its cost is the shipped (merged) router's mean fraction of layers run over the training queries.
    for d in args.depth_costs:
        train({k: v for k, v in chosen["route"][0].items() if k in configs[0]} | {"depth_cost": d})
    floor = chosen["route"][0]["dev_ndcg@10"] - args.fast_tolerance
    fast = [g for g in grid if g[0].get("depth_cost") and g[0]["dev_ndcg@10"] >= floor
            and g[0]["layers_run_train"] <= args.fast_layers]
    if fast:
        chosen["route-fast"] = min(fast, key=lambda g: (g[0]["layers_run_train"], -g[0]["dev_ndcg@10"]))
    # Each chosen and priced router against route, paired over the same training queries (out of fold): is a
    # cheaper router's loss on train more than noise?
    names = {id(g): k for k, g in chosen.items()}
    i_route = next(i for i, g in enumerate(grid) if g is chosen["route"])
    b = np.array([oof[i_route][q] for q in ids])  # route's, the reference
    paired = {}
    for g, row_oof in zip(grid, oof):
        row = g[0]
        name = names.get(id(g)) or (f"route-d{row['depth_cost']:g}" if row.get("depth_cost") else None)
        if name in (None, "route"):
            continue
        a = np.array([row_oof[q] for q in ids])
        paired[name] = {"ndcg@10": float(a.mean()), "route": float(b.mean()), "delta": float(a.mean() - b.mean()),
                        "se": float((a - b).std(ddof=1) / np.sqrt(len(ids))),
                        "p_student": paired_p_value(a, b, "student"), "p_fisher": paired_p_value(a, b, "fisher"),
                        "layers_run_train": row.get("layers_run_train")}
        print(f"{name} vs route: {paired[name]['delta']:+.4f} (se {paired[name]['se']:.4f}, "
              f"p {paired[name]['p_student']:.3f} t-test, {paired[name]['p_fisher']:.3f} randomization)", flush=True)
    out = {"model": lm.name, "doc_order": args.doc_order, "train_queries": len(tr_ids), "dev_queries": len(dev_ids),
           "static": static, "icr_dev_ndcg@10": icr_dev, "icr_all_ndcg@10": icr_all, "grid": [g[0] for g in grid],
           "chosen": {k: v[0] for k, v in chosen.items()}, "paired_vs_route": paired,
           "note": "static: dev split (20%) of the stored train queries; routers: out-of-fold nDCG@10 of "
                   f"{args.folds}-fold cross-fitting over all stored train queries"}
    Path("results").mkdir(exist_ok=True)
    Path(args.out or f"results/router-grid-{lm.name}.json").write_text(json.dumps(out, indent=1))
    for k, v in chosen.items():
        print(k, json.dumps(v[0]))
    if args.ship:
        ASSETS.mkdir(parents=True, exist_ok=True)
        suffix = {"route": "", "route+fs": "-fs", "route-bce": "-bce", "route-fast": "-fast"}
        for k, (_, router) in chosen.items():
            router.save(ASSETS / f"router-{lm.name}{suffix[k]}.safetensors")
        save_heads(ASSETS / f"heads-{lm.name}.json", [tuple(h) for h in best16["heads"]], lm.identity(),
                   prompt=scorer.builder.settings(), doc_order=args.doc_order,
                   detected_on=f"scifact/train ({len(tr_ids)} queries, {args.doc_order} order)",
                   dev_ndcg=best16["dev_ndcg@10"])
        print("shipped to", ASSETS)


if __name__ == "__main__":
    main()
