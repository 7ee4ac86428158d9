"""``routehead evaluate | plot``: every method and baseline on a collection's stored passes."""

from __future__ import annotations

import argparse
import json
from typing import Any

from routehead.assets import ROUTER_VARIANTS
from routehead.cli.options import data_args, job_from, print_warnings
from routehead.evaluation.baselines import BASELINES, NO_PASS
from routehead.selection import METHODS


def evaluate(args: argparse.Namespace) -> None:
    from routehead.evaluation.runs import evaluate as run_all
    from routehead.evaluation.runs import format_table, report, save_json

    job = job_from(args)
    if set(args.reranker) <= set(NO_PASS):  # nothing reads a pass: no model, no store
        sc, scorer = job.first_stage_only(), None
    else:
        sc, scorer = job.run()
    print_warnings(sc.collection)
    runs, extra = run_all(sc, args.reranker, scorer, router=args.router, heads=args.heads,
                          training_figures=args.training_figures)
    rep = report(sc, runs, baselines=[b for b in ("bm25", "icr", "static") if b in runs])
    rep.update(extra)
    if args.out:
        save_json(rep, args.out)
    if args.json:
        if len(args.reranker) == 1:
            name = args.reranker[0]
            print(json.dumps({"dataset": rep["dataset"], "split": rep["split"], "reranker": name,
                              "n_queries": rep["n_queries"], "metrics": rep["rerankers"][name]["metrics"], **extra}))
        else:
            print(json.dumps(rep))
    else:
        print(format_table(rep))
        for name, why in extra.get("training_figures", {}).items():
            print(f"note: {name} is a training figure here ({why})")


def plot(args: argparse.Namespace) -> None:
    from routehead.assets import router_path
    from routehead.evaluation.plots import head_maps

    sc, scorer = job_from(args).run()
    print_warnings(sc.collection)
    paths = head_maps(sc, scorer, args.out,
                      router_path=None if args.router is None else router_path(scorer.lm.name, args.router)[0])
    for p in paths:
        print(p)


def register(sub: Any) -> None:
    p = sub.add_parser("evaluate", help="metrics of re-rankers on a BEIR folder")
    data_args(p, "test")
    p.add_argument("--reranker", nargs="+", default=["route"], choices=[*BASELINES, *METHODS],
                   help="baselines (bm25, position, dense, oracle) and registered methods")
    p.add_argument("--heads", default=None, help="the asset of the head-set methods: a head-set JSON for static, "
                   "single and core, a layer window (JSON or s,e) for layers (default: the one shipped for the model)")
    p.add_argument("--router", default=None, help="router for route: a .safetensors or a shipped variant "
                   f"({', '.join(ROUTER_VARIANTS)}; default: the shipped router)")
    p.add_argument("--training-figures", action="store_true",
                   help="report a router's figures on a collection split it was trained on (named in the report's "
                        "training_figures) instead of refusing them")
    p.add_argument("--json", action="store_true")
    p.add_argument("--out", default=None, help="also write the full report as JSON")
    p.set_defaults(func=evaluate)

    p = sub.add_parser("plot", help="head maps (PNG): per-head nDCG@10 and router picks")
    data_args(p, "test")
    p.add_argument("--router", default=None)
    p.add_argument("--out", default="results/plots")
    p.set_defaults(func=plot)
