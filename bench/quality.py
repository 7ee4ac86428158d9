"""Quality table: every re-ranker on the stored forward passes of each collection, in one run.

    python bench/quality.py [--model smollm2-135m] [--jobs scifact:test trec-dl19-passage:test ...]

Re-rankers: bm25, dense (MiniLM), icr, single, static (shipped head set), route-bce (the paper's recipe: BCE
on greedy pseudo labels), route (the shipped default router: listwise-trained, probability-weighted heads),
route+fs (the same, may also route the first-stage score), oracle (analysis only). Paired t-tests on
nDCG@10 against bm25, icr, static and single. Writes results/quality-<model>.json and prints a markdown table.
Queries not yet in the store are scored first (slow on CPU: about 7 s a query for the default model).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from routehead.api import asset, default_heads_path, default_router_path
from routehead.collect import score_collection
from routehead.data import load_collection
from routehead.evaluate import dense_scores, make_run, query_embeddings, report
from routehead.heads import load_heads
from routehead.model import load_model
from routehead.router import load_router
from routehead.scorer import HeadScorer

JOBS = ["scifact:test", "trec-dl19-passage:test", "cranfield:test", "cisi:test", "med:test", "adi:test"]
ORDER = ["bm25", "dense", "icr", "single", "static", "route-bce", "route", "route+fs", "oracle"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data-root", default="../shared/data")
    ap.add_argument("--jobs", nargs="+", default=JOBS, help="name:split[:max_queries]")
    ap.add_argument("--top-k", type=int, default=20)
    ap.add_argument("--max-doc-tokens", type=int, default=160)
    ap.add_argument("--no-compute", action="store_true", help="only queries already in the store")
    ap.add_argument("--no-dense", action="store_true")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (1 when other jobs share the CPU)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    lm = load_model(args.model)
    scorer = HeadScorer(lm, max_doc_tokens=args.max_doc_tokens)
    heads, hbody = load_heads(default_heads_path(lm.name), lm.identity())
    routers = {"route": load_router(default_router_path(lm.name), lm.identity())}
    for variant in ("fs", "bce"):
        path = asset(f"router-{lm.name}-{variant}.safetensors")
        if path.is_file():
            routers[f"route{'+' if variant == 'fs' else '-'}{variant}"] = load_router(path, lm.identity())
    results = []
    for job in args.jobs:
        name, split, *cap = job.split(":")
        coll = load_collection(f"{args.data_root}/{name}", split)
        sc = score_collection(coll, None if args.no_compute else scorer, scorer.settings(), top_k=args.top_k,
                              max_queries=int(cap[0]) if cap else None)
        scored = set(sc.entries)
        sc.first_stage = {q: c for q, c in sc.first_stage.items() if q in scored}  # evaluate scored queries only
        t = time.time()
        runs = {"bm25": make_run(sc, "bm25")}
        if not args.no_dense:
            runs["dense"] = make_run(sc, "dense", dense_scores=dense_scores(sc))
        runs["icr"] = make_run(sc, "icr")
        runs["single"] = make_run(sc, "single", heads=heads[:1], norm=hbody.get("norm", "sum"))
        runs["static"] = make_run(sc, "static", heads=heads, norm=hbody.get("norm", "sum"))
        sizes = {}
        for rname, router in routers.items():
            emb = query_embeddings(sc, scorer, router.config.embed_layer, router.config.pooling)
            sizes[rname] = []
            runs[rname] = make_run(sc, "route", router=router, embeddings=emb, routed_sizes=sizes[rname])
        runs["oracle"] = make_run(sc, "oracle", norm="z")
        rep = report(sc, runs, baselines=["bm25", "icr", "static", "single"])
        rep["mean_heads_routed"] = {k: sum(v) / max(len(v), 1) for k, v in sizes.items()}
        nd = {k: v["metrics"]["ndcg@10"] for k, v in rep["rerankers"].items()}
        gap = nd["oracle"] - nd["static"]
        rep["static_to_oracle_gap_closed"] = {k: (nd[k] - nd["static"]) / gap if gap > 0 else None for k in routers}
        rep["seconds"] = round(time.time() - t, 1)
        results.append(rep)
        print(json.dumps({"dataset": name, "n": rep["n_queries"], **{k: round(v, 4) for k, v in nd.items()}}),
              flush=True)
    out = {"model": lm.name, "machine": platform.processor() or platform.machine(), "date": time.strftime("%Y-%m-%d"),
           "settings": {"top_k": args.top_k, "max_doc_tokens": args.max_doc_tokens, "heads": hbody.get("detected_on"),
                        "static_norm": hbody.get("norm")}, "results": results}
    Path("results").mkdir(exist_ok=True)
    Path(f"results/quality-{lm.name}.json").write_text(json.dumps(out, indent=1))
    print(markdown(out))


MARK = {"bm25": "b", "icr": "i", "static": "s", "single": "1"}


def markdown(out: dict) -> str:
    """nDCG@10 table; superscripts +b/+i/+s/+1 (-b...): significantly above (below) bm25/icr/static/single
    (paired t-test, p < 0.05)."""
    cols = [c for c in ORDER if c in out["results"][0]["rerankers"]]
    lines = ["| collection | n | " + " | ".join(cols) + " | heads routed | gap closed |",
             "|---|---|" + "---|" * len(cols) + "---|---|"]
    for rep in out["results"]:
        cells = []
        for c in cols:
            r = rep["rerankers"][c]
            marks = "".join(("+" if v["better"] else "-") + MARK[b] for b, v in r["vs"].items()
                            if v["better"] or v["worse"])
            cells.append(f"{r['metrics']['ndcg@10']:.3f}{'<sup>' + marks + '</sup>' if marks else ''}")
        routed = rep["mean_heads_routed"].get("route", 0.0)
        gap = rep["static_to_oracle_gap_closed"].get("route")
        gap_s = f"{gap:.0%}" if gap is not None else "-"
        lines.append(f"| {rep['dataset']} | {rep['n_queries']} | " + " | ".join(cells) + f" | {routed:.1f} | {gap_s} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
