"""Quality table: every re-ranker on the stored forward passes of each collection and prompt order, in one run.

    python bench/quality.py [--model smollm2-135m] [--orders reverse input shuffle] [--jobs scifact:test ...]
                            [--router NAME=PATH ...]

Re-rankers: bm25, position (the prompt position alone: what position bias gives without reading), dense
(MiniLM), icr, single (the best shipped head), static (the shipped 16 heads, QRHead), route-bce (the paper's
recipe: BCE on greedy pseudo labels), route (the shipped default router: listwise-trained, probability-weighted
heads), route+fs (may also route the first-stage score), oracle (analysis only). Every attention re-ranker
aggregates as the references do (sum over its heads, outlier mask, sum). Orders (:mod:`routehead.engine.order`):
reverse (the references' published order, best first-stage candidate last), input (first-stage order) and
shuffle (a fixed random order per query: the content signal). Paired t-tests on nDCG@10 against bm25, icr,
static and single. Writes results/quality-<model>.json and prints a markdown table. Queries not yet in the
store are scored first (slow on CPU: seconds a query for the default model). ``--router NAME=PATH`` adds a
router that is not shipped (e.g. one trained in another order or with a depth budget) as one more column. A
router is never evaluated on a collection split it was trained on (its ``trained_on``; e.g. the ``multi`` router
of bench/loco.py): its cell there says "seen".
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from routehead.assets import ROUTER_VARIANTS, default_heads_path, router_path
from routehead.engine.model import load_model
from routehead.engine.scorer import HeadScorer
from routehead.evaluation.runs import evaluate, report, run_of
from routehead.offline.collect import score_collection
from routehead.offline.data import load_collection
from routehead.offline.dense import dense_scores
from routehead.selection import load_method
from routehead.selection.heads import load_heads
from routehead.settings import DEFAULT_MAX_DOC_TOKENS

JOBS = ["scifact:test", "trec-dl19-passage:test", "cranfield:test", "cisi:test", "med:test", "adi:test"]
ORDER = ["bm25", "position", "dense", "icr", "single", "static", "route-bce", "route", "route+fs", "route-fast",
         "route-multi", "oracle"]


def method_columns(model: str, extra: list[str]) -> dict[str, tuple[str, str | None]]:
    """Column name -> (registered method, its router): the shipped heads and router of ``model``, each shipped
    router variant (``route-bce``, ``route+fs``, ``route-fast``, ``route-multi``) and every
    ``--router NAME=PATH``."""
    cols: dict[str, tuple[str, str | None]] = {"icr": ("icr", None), "single": ("single", None),
                                               "static": ("static", None), "route": ("route", None)}
    for variant in ROUTER_VARIANTS:
        if router_path(model, variant)[0].is_file():
            cols[f"route{'+' if variant == 'fs' else '-'}{variant}"] = ("route", variant)
    for spec in extra:
        name, _, path = spec.partition("=")
        if not path or name in cols:
            raise SystemExit(f"--router wants NAME=PATH with a new NAME, got {spec!r}")
        cols[name] = ("route", path)
    return cols


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data-root", default="../shared/data")
    ap.add_argument("--jobs", nargs="+", default=JOBS, help="name:split[:max_queries]")
    ap.add_argument("--orders", nargs="+", default=["reverse", "input", "shuffle"])
    ap.add_argument("--top-k", type=int, default=20)
    ap.add_argument("--max-doc-tokens", type=int, default=DEFAULT_MAX_DOC_TOKENS)
    ap.add_argument("--layout", default="reference", help="prompt layout (v1: heads and routers are still the "
                    "shipped ones, chosen under the reference layout)")
    ap.add_argument("--no-compute", action="store_true", help="only queries already in the store")
    ap.add_argument("--no-dense", action="store_true")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (1 when other jobs share the CPU)")
    ap.add_argument("--out", default=None, help="default results/quality-<model>.json")
    ap.add_argument("--router", nargs="+", default=[], metavar="NAME=PATH", help="extra routers, one column each")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    lm = load_model(args.model)
    scorer = HeadScorer(lm, max_doc_tokens=args.max_doc_tokens, layout=args.layout)
    _, hbody = load_heads(default_heads_path(lm.name), lm.identity())
    columns = method_columns(lm.name, args.router)
    seen = {col: load_method(m, lm.identity(), router=a).router.config.trained_on
            for col, (m, a) in columns.items() if m == "route"}
    results = []
    for job in args.jobs:
        name, split, *cap = job.split(":")
        coll = load_collection(f"{args.data_root}/{name}", split)
        dense = None
        for order in args.orders:
            sc = score_collection(coll, None if args.no_compute else scorer, scorer.settings(), top_k=args.top_k,
                                  max_queries=int(cap[0]) if cap else None, doc_order=order)
            scored = set(sc.entries)
            if not scored:
                continue
            sc.first_stage = {q: c for q, c in sc.first_stage.items() if q in scored}  # scored queries only
            t = time.time()
            runs, _ = evaluate(sc, ["bm25", "position"])
            if not args.no_dense:
                dense = dense or dense_scores(sc)  # per candidate, whatever the prompt order: computed once
                runs["dense"] = run_of(sc, dense.__getitem__)
            sizes = {}
            for col, (method, asset) in columns.items():  # every column a registered method and its asset
                if f"{coll.name}/{split}" in seen.get(col, ()):  # trained on it: no test figure
                    continue
                col_runs, extra = evaluate(sc, [method], scorer, router=asset)
                runs[col] = col_runs[method]
                if f"{method}_mean_heads" in extra:
                    sizes[col] = extra[f"{method}_mean_heads"]
            runs["oracle"] = evaluate(sc, ["route", "oracle"], scorer)[0]["oracle"]  # over the route's pool
            rep = report(sc, runs, baselines=["bm25", "icr", "static", "single"])
            rep["doc_order"] = order
            rep["mean_heads_routed"] = sizes
            nd = {k: v["metrics"]["ndcg@10"] for k, v in rep["rerankers"].items()}
            gap = nd["oracle"] - nd["static"]
            rep["static_to_oracle_gap_closed"] = {k: (nd[k] - nd["static"]) / gap if gap > 0 else None
                                                  for k in sizes}
            rep["seconds"] = round(time.time() - t, 1)
            results.append(rep)
            print(json.dumps({"dataset": name, "order": order, "n": rep["n_queries"],
                              **{k: round(v, 4) for k, v in nd.items()}}), flush=True)
    out = {"model": lm.name, "machine": platform.processor() or platform.machine(), "date": time.strftime("%Y-%m-%d"),
           "command": "python bench/quality.py " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in
                                                             vars(args).items() if v not in (None, False)),
           "settings": {"top_k": args.top_k, "max_doc_tokens": args.max_doc_tokens, "heads": hbody.get("detected_on"),
                        "prompt": scorer.builder.settings()}, "results": results}
    Path("results").mkdir(exist_ok=True)
    Path(args.out or f"results/quality-{lm.name}.json").write_text(json.dumps(out, indent=1))
    print(markdown(out))


MARK = {"bm25": "b", "icr": "i", "static": "s", "single": "1"}


def markdown(out: dict) -> str:
    """nDCG@10 table; superscripts +b/+i/+s/+1 (-b...): significantly above (below) bm25/icr/static/single
    (paired t-test, p < 0.05)."""
    present = {c: None for rep in out["results"] for c in rep["rerankers"]}
    cols = [c for c in ORDER if c in present] + [c for c in present if c not in ORDER]
    lines = ["| collection | order | n | " + " | ".join(cols) + " | heads routed |",
             "|---|---|---|" + "---|" * len(cols) + "---|"]
    for rep in out["results"]:
        cells = []
        for c in cols:
            if c not in rep["rerankers"]:  # a router trained on this collection split
                cells.append("seen")
                continue
            r = rep["rerankers"][c]
            marks = "".join(("+" if v["better"] else "-") + MARK[b] for b, v in r["vs"].items()
                            if v["better"] or v["worse"])
            cells.append(f"{r['metrics']['ndcg@10']:.3f}{'<sup>' + marks + '</sup>' if marks else ''}")
        routed = rep["mean_heads_routed"].get("route", 0.0)
        lines.append(f"| {rep['dataset']} | {rep['doc_order']} | {rep['n_queries']} | " + " | ".join(cells)
                     + f" | {routed:.1f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
