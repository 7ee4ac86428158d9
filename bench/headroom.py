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
from routehead.offline.job import ScoreJob
from routehead.offline.views import query_embeddings
from routehead.selection import load_method
from routehead.settings import FIT

MENU = ("static", "core", "layers", "single", "icr")  # the published selections a router could choose among


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data", required=True)
    ap.add_argument("--split", default="test")
    ap.add_argument("--doc-order", default="shuffle")
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--clusters", type=int, nargs="*", default=[2, 4, 8])
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
    runs = {"split_judgment": lambda: split_judgment_headroom(sc, static, args.seeds),
            "classic": lambda: classic_headroom(sc, static),
            "domain": lambda: domain_oracle(sc, static, seeds=max(1, args.seeds // 2)),
            "menu_split": lambda: menu_headroom(sc, list(menu.values()), menu["static"], args.seeds)}
    emb = None
    for c in args.clusters:
        def run_cluster(c: int = c) -> object:
            nonlocal emb
            if emb is None:  # router inputs (FIT's embedding layer and pooling), cached next to the store
                emb = {q: v.numpy() for q, v in query_embeddings(sc, scorer, FIT.embed_layer, FIT.pooling).items()}
            return cluster_oracle(sc, emb, c, seeds=max(1, args.seeds // 2))
        runs[f"cluster_{c}"] = run_cluster
    out = Path("results") / f"headroom-{args.model}-{res['collection']}-{args.split}-{args.doc_order}.json"
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
