"""A label-free per-query head choice (issue #35 item 3, a negative result): per query, keep the heads of the
static and CoRe sets that agree most with their consensus (the mean of their z-scored document scores): the top
4 or 8 by agreement, or all weighted by a softmax over it (temperature 0.1). Against the static set and CoRe-8.

    python bench/consensus_probe.py ../shared/data/scifact:train ../shared/data/cisi ...   # stored passes only

Shuffled stores; at most 300 queries a collection. Writes results/consensus-probe-<model>.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from routehead.cli.options import data_spec
from routehead.engine.aggregate import zscore
from routehead.evaluation.runs import save_json
from routehead.metrics import ndcg_at_k, paired_p_value
from routehead.offline.job import ScoreJob
from routehead.offline.views import Query, doc_scores, queries_for
from routehead.selection import load_method


def choices(q: Query, static: list[int], core: list[int]) -> dict[str, float]:
    """nDCG@10 of each selection rule on one query (pool: static heads first, then CoRe's others)."""
    def nd(s: np.ndarray) -> float:
        return float(ndcg_at_k(s, q.gains, q.ideal))

    z = zscore(np.asarray(q.single, dtype=np.float64))
    agree = (z * zscore(z.mean(0)[None])[0]).mean(1)
    top = list(np.argsort(-agree))
    w = np.exp((agree - agree.max()) / 0.1)
    return {"static": nd(doc_scores(q, static)), "core": nd(doc_scores(q, core)),
            "agree4": nd(doc_scores(q, top[:4])), "agree8": nd(doc_scores(q, top[:8])),
            "soft": nd(doc_scores(q, list(range(len(q.rows))), w / w.sum()))}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("collections", nargs="+", metavar="PATH[:SPLIT]")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--max-queries", type=int, default=300)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    out: dict = {"model": args.model, "doc_order": "shuffle", "collections": {}}
    scorer = None
    for spec in args.collections:
        path, split = data_spec(spec, "test")
        sc, scorer = ScoreJob(data=path, split=split, model=args.model, progress=False).with_options(
            doc_order="shuffle").run(compute=False, scorer=scorer)
        ident = scorer.lm.identity()
        static = [tuple(h) for h in load_method("static", ident).select(None).heads.heads]
        core = [tuple(h) for h in load_method("core", ident).select(None).heads.heads]
        pool = list(dict.fromkeys(static + core))
        rows = [choices(q, list(range(len(static))), [pool.index(h) for h in core])
                for q in queries_for(sc, pool, False, sorted(sc.entries)[:args.max_queries])]
        vals = {k: np.array([r[k] for r in rows]) for k in rows[0]} if rows else {}
        out["collections"][f"{sc.collection.name}/{split}"] = {
            "queries": len(rows), "ndcg@10": {k: round(float(v.mean()), 4) for k, v in vals.items()},
            "vs_core_p": {k: round(paired_p_value(vals[k], vals["core"]), 4) for k in ("agree4", "agree8", "soft")}}
        print(json.dumps({spec: out["collections"][f"{sc.collection.name}/{split}"]}), flush=True)
    save_json(out, Path(args.out or f"results/consensus-probe-{args.model}.json"))
    return out


if __name__ == "__main__":
    main()
