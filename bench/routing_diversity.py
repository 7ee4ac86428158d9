"""Does the shipped router route? (issue #35, item 4) Per stored collection: distinct head sets routed, the share
of queries given the most common set, the mean Jaccard distance between queries' sets.

    python bench/routing_diversity.py --model smollm2-135m --data ../shared/data/scifact --split train
    python bench/routing_diversity.py --model smollm2-135m --data ../shared/data/adi --split test --doc-order reverse

Reads stored passes only (plus the query embeddings, cached next to the store); a router other than the shipped
one with ``--router``. Writes results/routing-diversity-<model>-<collection>-<split>.json (one key per run).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from routehead.evaluation.analysis import routing_diversity
from routehead.evaluation.runs import save_json, sc_identity
from routehead.evaluation.scores import method_scores
from routehead.offline.job import ScoreJob
from routehead.selection import load_method


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data", required=True)
    ap.add_argument("--split", default="test")
    ap.add_argument("--doc-order", default="shuffle")
    ap.add_argument("--router", default=None)
    args = ap.parse_args()
    sc, scorer = ScoreJob(data=args.data, split=args.split, model=args.model, dtype="float32",
                          progress=False).with_options(doc_order=args.doc_order).run(compute=False)
    method = load_method("route", sc_identity(sc, scorer), router=args.router)
    chosen: dict = {}
    method_scores(sc, method, scorer, selections=chosen)
    got = {**routing_diversity(chosen), "router": args.router or "shipped", "order": args.doc_order}
    print(json.dumps(got))
    out = Path("results") / f"routing-diversity-{args.model}-{Path(args.data).name}-{args.split}.json"
    prev = json.loads(out.read_text()) if out.exists() else {}
    prev[f"{args.router or 'shipped'}/{args.doc_order}"] = got
    save_json(prev, out)


if __name__ == "__main__":
    main()
