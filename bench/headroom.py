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
from routehead.evaluation.headroom import classic_headroom, domain_oracle, split_judgment_headroom
from routehead.evaluation.runs import save_json
from routehead.offline.job import ScoreJob


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data", required=True)
    ap.add_argument("--split", default="test")
    ap.add_argument("--doc-order", default="shuffle")
    ap.add_argument("--seeds", type=int, default=10)
    args = ap.parse_args()
    sc, _ = ScoreJob(data=args.data, split=args.split, model=args.model, dtype="float32",
                     progress=False).with_options(doc_order=args.doc_order).run(compute=False)
    asset = json.loads(default_heads_path(args.model).read_text())
    static = [tuple(h) for h in asset["heads"]]
    res = {"model": args.model, "collection": Path(args.data).name, "split": args.split, "order": args.doc_order,
           "stored_queries": len(sc.entries), "date": datetime.date.today().isoformat(),
           "baseline": f"shipped static set ({len(static)} heads, detected on {asset.get('detected_on')})"}
    for name, fn in (("split_judgment", lambda: split_judgment_headroom(sc, static, args.seeds)),
                     ("classic", lambda: classic_headroom(sc, static)),
                     ("domain", lambda: domain_oracle(sc, static, seeds=max(1, args.seeds // 2)))):
        res[name] = dataclasses.asdict(fn())
        print(name, json.dumps(res[name]), flush=True)
    save_json(res, Path("results") / f"headroom-{args.model}-{res['collection']}-{args.split}-{args.doc_order}.json")


if __name__ == "__main__":
    main()
