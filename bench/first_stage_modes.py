"""What a router that routes the first stage gives without first-stage scores (a Cohere-style request carries
none): its routed heads with BM25's scores, with the candidates' order standing in (minus the rank, what
``Reranker.rerank`` uses when no scores come), and with the heads alone; beside the static set and CoRe-8.

    python bench/first_stage_modes.py ../shared/data/med ../shared/data/adi --orders shuffle reverse

Stored passes only; the ``fs`` router by default (``--router``). Writes results/first-stage-modes-<model>.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from routehead.cli.options import data_spec
from routehead.engine.aggregate import combine, first_stage_signal
from routehead.evaluation.runs import save_json
from routehead.metrics import ndcg_at_k, paired_p_value
from routehead.offline.collect import ScoredCollection
from routehead.offline.job import ScoreJob
from routehead.offline.views import gains, query_embeddings, selection_scores
from routehead.selection import load_method


def ndcg_of(sc: ScoredCollection, ids: list[str], score_of: Callable[[str], np.ndarray]) -> np.ndarray:
    return np.array([float(ndcg_at_k(score_of(q), *gains(sc, q, sc.entries[q].doc_ids))) for q in ids])


def modes(sc: ScoredCollection, scorer: Any, router: str) -> dict[str, np.ndarray]:
    """Per-query nDCG@10 of the static set, CoRe-8 and the router's three ways of reading the first stage: the
    store's BM25 scores, the candidates' order (stored in first-stage order: what ``Reranker.rerank`` reads when
    no scores come, the same :func:`first_stage_signal`), and none."""
    ids, ident = sorted(sc.entries), scorer.lm.identity()
    route = load_method("route", ident, router)
    emb = query_embeddings(sc, scorer, *route.embedding, qids=ids)
    sel = {q: route.select(emb[q]) for q in ids}
    attn = {q: selection_scores(sc, q, dataclasses.replace(sel[q], first_stage_weight=0.0)) for q in ids}
    vals = {}
    for m in ("static", "core"):
        fixed = load_method(m, ident).select(None)
        vals[m] = ndcg_of(sc, ids, lambda q, s=fixed: selection_scores(sc, q, s))
    vals["route, BM25 scores"] = ndcg_of(sc, ids, lambda q: selection_scores(sc, q, sel[q]))
    vals["route, heads alone"] = ndcg_of(sc, ids, lambda q: attn[q])
    vals["route, the order"] = ndcg_of(sc, ids, lambda q: combine(
        attn[q], first_stage_signal(None, len(attn[q])), sel[q].first_stage_weight))
    return vals


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("collections", nargs="+", metavar="PATH[:SPLIT]")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--router", default="fs")
    ap.add_argument("--orders", nargs="+", default=["shuffle", "reverse"])
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    out: dict = {"model": args.model, "router": args.router, "runs": {}}
    scorer = None
    for spec in args.collections:
        path, split = data_spec(spec, "test")
        for order in args.orders:
            sc, scorer = ScoreJob(data=path, split=split, model=args.model, progress=False).with_options(
                doc_order=order).run(compute=False, scorer=scorer)
            if not sc.entries:
                continue
            vals = modes(sc, scorer, args.router)
            best = max(("static", "core"), key=lambda m: vals[m].mean())
            key = f"{sc.collection.name}/{split} {order}"
            out["runs"][key] = {"queries": len(sc.entries),
                                "ndcg@10": {k: round(float(v.mean()), 4) for k, v in vals.items()},
                                "strongest_static": best,
                                "p_vs_strongest_static": {k: round(paired_p_value(v, vals[best]), 4)
                                                          for k, v in vals.items() if k.startswith("route")}}
            print(json.dumps({key: out["runs"][key]}), flush=True)
    save_json(out, Path(args.out or f"results/first-stage-modes-{args.model}.json"))
    return out


if __name__ == "__main__":
    main()
