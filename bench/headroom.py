"""Honest headroom of routing over stored passes (issue #35, item 1): the split-judgment oracle and the domain
oracle against the shipped static set, with the classic (in-sample) oracle beside them for scale.

    python bench/headroom.py --model smollm2-135m --data ../shared/data/scifact --split train
    python bench/headroom.py --model gemma3-270m --data ../shared/data/adi --split test     # once stored

Reads only stored passes (``--doc-order shuffle`` stores by default; no forward pass). Writes
results/headroom-<model>-<collection>-<split>-<order>.json. See :mod:`routehead.evaluation.headroom`.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
from pathlib import Path

import numpy as np

from routehead.assets import default_heads_path
from routehead.errors import RouteheadError
from routehead.evaluation.headroom import (
    classic_headroom,
    cluster_oracle,
    domain_oracle,
    menu_headroom,
    split_judgment_headroom,
)
from routehead.evaluation.runs import save_json, sc_identity
from routehead.metrics import ndcg_at_k
from routehead.offline.collect import ScoredCollection
from routehead.offline.job import ScoreJob
from routehead.offline.views import gains, query_embeddings, selection_scores
from routehead.selection import load_method
from routehead.selection.base import Selection
from routehead.settings import FIT

MENU = ("static", "core", "layers", "single", "icr")  # the published selections a router could choose among


def best_of(sc: ScoredCollection, menu: dict[str, Selection]) -> str:
    """The menu selection with the best mean nDCG@10 over every stored query of ``sc``."""
    def mean(sel: Selection) -> float:
        return float(np.mean([ndcg_at_k(selection_scores(sc, q, sel), *gains(sc, q, sc.entries[q].doc_ids), 10)
                              for q in sorted(sc.entries)]))
    return max(menu, key=lambda m: mean(menu[m]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data", required=True)
    ap.add_argument("--split", default="test")
    ap.add_argument("--doc-order", default="shuffle")
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--clusters", type=int, nargs="*", default=[2, 4, 8])
    ap.add_argument("--baseline", default="static", choices=[*MENU, "best"],
                    help="the fixed selection the split and menu oracles are measured against (default the shipped "
                    "static set, as issue #35 defines headroom); best: the menu selection with the best mean "
                    "nDCG@10 on these very queries (an in-sample pick that favours the baseline, as the strongest "
                    "static selection of bench/loco.py)")
    ap.add_argument("--only", nargs="*", default=None, help="run only these analyses (names as in the JSON)")
    args = ap.parse_args()
    sc, scorer = ScoreJob(data=args.data, split=args.split, model=args.model, dtype="float32",
                     progress=False).with_options(doc_order=args.doc_order).run(compute=False)
    asset = json.loads(default_heads_path(args.model).read_text())
    static = [tuple(h) for h in asset["heads"]]
    res = {"model": args.model, "collection": Path(args.data).name, "split": args.split, "order": args.doc_order,
           "stored_queries": len(sc.entries), "date": datetime.date.today().isoformat(),
           "baseline": f"shipped static set ({len(static)} heads, detected on {asset.get('detected_on')})"}
    identity = sc_identity(sc, scorer)
    menu = {}
    for m in MENU:  # a selection whose asset the model lacks (e.g. Gemma's CoRe set before it ships) is left out
        try:
            menu[m] = load_method(m, identity).select()
        except RouteheadError as exc:
            print(f"menu: {m} left out ({exc})", flush=True)
    res["menu"] = list(menu)
    base_name = best_of(sc, menu) if args.baseline == "best" else args.baseline
    base = menu[base_name].heads.heads
    base_heads = None if base is None else list(base)  # None: every head (ICR)
    if args.baseline != "static":
        how = "chosen as the best on these queries" if args.baseline == "best" else "named"
        res["baseline"] = f"{base_name} ({how})"
    runs = {"split_judgment": lambda: split_judgment_headroom(sc, base_heads, args.seeds),
            "classic": lambda: classic_headroom(sc, base_heads),
            "domain": lambda: domain_oracle(sc, static, seeds=max(1, args.seeds // 2)),
            "menu_split": lambda: menu_headroom(sc, list(menu.values()), menu[base_name], args.seeds)}
    emb = None
    for c in args.clusters:
        def run_cluster(c: int = c) -> object:
            nonlocal emb
            if emb is None:  # router inputs (FIT's embedding layer and pooling), cached next to the store
                emb = {q: v.numpy() for q, v in query_embeddings(sc, scorer, FIT.embed_layer, FIT.pooling).items()}
            return cluster_oracle(sc, emb, c, seeds=max(1, args.seeds // 2))
        runs[f"cluster_{c}"] = run_cluster
    tail = "" if args.baseline == "static" else f"-vs-{args.baseline}"
    out = Path("results") / f"headroom-{args.model}-{res['collection']}-{args.split}-{args.doc_order}{tail}.json"
    if args.only and out.exists():  # a partial run keeps the other analyses' figures
        res = {**json.loads(out.read_text()), **{k: v for k, v in res.items() if not isinstance(v, dict)}}
    for name, fn in runs.items():
        if args.only and name not in args.only:
            continue
        res[name] = dataclasses.asdict(fn())
        print(name, json.dumps(res[name]), flush=True)
    save_json(res, out)


if __name__ == "__main__":
    main()
