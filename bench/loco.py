"""Leave one collection out (issue #35, item 2): does a router trained on several collections route better on one
it has never seen than the router trained on scifact alone?

    python bench/loco.py --model smollm2-135m --doc-order shuffle --no-compute \
        --base ../shared/data/scifact:train \
        --collections ../shared/data/scifact:test ../shared/data/trec-dl19-passage:test \
                      ../shared/data/cranfield:test ../shared/data/cisi:test ../shared/data/med:test \
                      ../shared/data/adi:test

For each held-out collection H of ``--collections`` (``PATH[:SPLIT]``, split test by default) with stored passes:
a router fitted on the base (scifact train) plus every other collection's stored queries (one merged view,
:func:`routehead.offline.collect.merge_scored`), evaluated on H's stored passes beside the router fitted on the
base alone (``route-base``), the shipped static set (QRHead), CoRe (``core``), the Selective-ICR layer window
(``layers``), ICR and the learned linear combination of heads fitted on route-loco's training queries (``linear``,
:mod:`routehead.training.linear`): per method nDCG@10, paired p-values of both routers against every other method
(t-test and randomization, per query), and each router's routing diversity on H. ``pooled``: the same over all held-out
queries together (each query scored by a router that never saw its collection). Every router is fitted with the
shipped router's recipe (its :class:`FitSettings`, read from the router file, see bench/train_router.py), so the
routers differ only in the queries they saw; ``--set KEY=VALUE`` changes a field (quick runs, tiny models).

A collection a router has seen is never reported as a test figure for it: each router's record of its training
collections (``RouterConfig.trained_on``) is checked against H before H is evaluated. Finally a router is fitted on
the base and every collection but the base collection's own test split, which stays its test (``--all-out``;
``--ship`` copies it into the package as the ``multi`` router variant): its out-of-fold nDCG@10 is a training
figure; it has a test figure only on that split (the route-loco figure there: the same recipe and collections).

Reads stored passes only with ``--no-compute`` (a collection without them is skipped and named), plus the query
embeddings (cached next to each store; a short pass per query not yet cached). Writes
results/loco-<model>-<order>.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from routehead.assets import router_path
from routehead.cli.options import data_spec
from routehead.errors import RouteheadError
from routehead.evaluation.analysis import routing_diversity
from routehead.evaluation.runs import save_json, sc_identity
from routehead.evaluation.scores import method_scores
from routehead.metrics import ndcg_at_k, paired_p_value, rank_order
from routehead.offline.collect import ScoredCollection, merge_scored, namespace
from routehead.offline.job import ScoreJob
from routehead.offline.views import first_stage_scores, gains
from routehead.selection import load_method
from routehead.selection.base import Method
from routehead.selection.route import Route
from routehead.selection.router import Router, load_router
from routehead.settings import SCORING, FitSettings
from routehead.training.fit import fit_router
from routehead.training.linear import FixedSelection, fit_linear_on

COLLECTIONS = [f"../shared/data/{c}:test" for c in ("scifact", "trec-dl19-passage", "cranfield", "cisi", "med",
                                                    "adi")]
FIXED = ("static", "core", "layers", "single", "icr")  # beside the routers; an asset the model lacks is skipped
STATIC = ("static", "core", "layers", "single")  # the static selections the routers must not fall below


def name_of(sc: ScoredCollection) -> str:
    return namespace(sc).rstrip("/")


def recipe(router_file: str | None, model: str, identity: dict[str, Any], overrides: list[str]) -> FitSettings:
    """The FitSettings the shipped router (or ``router_file``) was fitted with, as its file records them (its
    training record; what older routers did not record there, from their config: the pool's size, the embedding
    and the routing rule), then ``overrides`` (``KEY=VALUE``, the value read as JSON, else as a string). A model
    without a shipped router starts from the defaults."""
    path, _ = router_path(model, router_file)
    values: dict[str, Any] = {}
    if path.is_file():
        cfg = load_router(path, identity).config
        known = {f.name for f in fields(FitSettings)}
        folds = int(cfg.training.get("folds", 1))  # K cross-fitted routers merge into one of K times the size
        values = {"embed_layer": cfg.embed_layer, "pooling": cfg.pooling, "use_first_stage": cfg.use_first_stage,
                  "pool_size": len(cfg.pool), "route_max": cfg.max_heads, "dim": cfg.dim // max(folds, 1)}
        values.update({k: v for k, v in cfg.training.items() if k in known})  # all of them, in newer routers
    else:
        print(f"note: no router file {path}; fitting with the default FitSettings", file=sys.stderr)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or key not in {f.name for f in fields(FitSettings)}:
            raise SystemExit(f"--set wants FIELD=VALUE with a FitSettings field, got {item!r}")
        try:
            values[key] = json.loads(raw)
        except json.JSONDecodeError:
            values[key] = raw
    return FitSettings(**values)


def train_store_parser(doc: str | None) -> argparse.ArgumentParser:
    """The arguments of a study that fits the shipped recipe on one stored train split (bench/start_choice.py,
    bench/fold_routing.py): the store, the recipe and its changes, the torch threads."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data", default="../shared/data/scifact")
    ap.add_argument("--split", default="train")
    ap.add_argument("--doc-order", default="reverse")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--max-queries", type=int, default=None)
    ap.add_argument("--recipe", default=None, help="the router file whose FitSettings are used (default: the "
                    "model's shipped router)")
    ap.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE", help="change a FitSettings field")
    ap.add_argument("--threads", type=int, default=1)
    return ap


def train_store(args: argparse.Namespace) -> tuple[ScoredCollection, Any, FitSettings]:
    """:func:`train_store_parser`'s stored split (stored passes only), its scorer and the recipe."""
    torch.set_num_threads(args.threads)
    job = ScoreJob(data=args.data, split=args.split, model=args.model, dtype=args.dtype, stored_only=True,
                   progress=False, max_queries=args.max_queries).with_options(doc_order=args.doc_order)
    sc, scorer = job.run(compute=False)
    return sc, scorer, recipe(args.recipe, args.model, scorer.lm.identity(), args.set)


def load_store(spec: str, args: argparse.Namespace, scorer: Any, split: str = "test"
               ) -> tuple[ScoredCollection | None, Any, str | None]:
    """A collection split's stored passes (scored first unless ``--no-compute``), the scorer, and why it is
    missing when it is (no folder, or no stored passes)."""
    path, split = data_spec(spec, split)
    if not Path(path).is_dir():
        return None, scorer, f"no collection folder {path}"
    job = ScoreJob(data=path, split=split, model=args.model, dtype=args.dtype, progress=False,
                   max_queries=args.max_queries).with_options(doc_order=args.doc_order, top_k=args.top_k,
                                                              max_doc_tokens=args.max_doc_tokens)
    sc, scorer = job.run(compute=not args.no_compute, scorer=scorer)
    if not sc.entries:
        return None, scorer, f"no stored passes for {sc.collection.name}/{split} ({args.doc_order} order)"
    return sc, scorer, None


def per_query(sc: ScoredCollection, method: Method, scorer: Any, qids: list[str],
              chosen: dict | None = None, ranking: dict | None = None) -> np.ndarray:
    """nDCG@10 of each stored query under ``method`` (its selection aggregated as the live pass does);
    ``ranking`` collects each query's order of its candidates (indices, best first), which is all a later
    analysis needs to score the method on other judgments (``split_judgment_gap``)."""
    scores = method_scores(sc, method, scorer, qids, selections=chosen)
    if ranking is not None:
        ranking.update({q: rank_order(scores[q]).tolist() for q in qids})
    return np.array([float(ndcg_at_k(scores[q], *gains(sc, q, sc.entries[q].doc_ids), 10)) for q in qids])


def first_stage(sc: ScoredCollection, qids: list[str]) -> np.ndarray:
    """nDCG@10 of each stored query's first-stage (BM25) order: the reference every re-ranker starts from."""
    return np.array([float(ndcg_at_k(first_stage_scores(sc, q), *gains(sc, q, sc.entries[q].doc_ids), 10))
                     for q in qids])


def score_all(sc: ScoredCollection, methods: dict[str, Method], scorer: Any,
              chosen: dict[str, dict] | None = None, rankings: dict[str, dict] | None = None
              ) -> dict[str, np.ndarray]:
    """Per-query nDCG@10 of every method on one store, and BM25's order (``chosen`` collects routings,
    ``rankings`` candidate orders, for the methods they name)."""
    qids = sorted(sc.entries)
    vals = {col: per_query(sc, m, scorer, qids, (chosen or {}).get(col), (rankings or {}).get(col))
            for col, m in methods.items()}
    vals["bm25"] = first_stage(sc, qids)
    return vals


def compare(vals: dict[str, np.ndarray], routers: tuple[str, ...]) -> dict[str, Any]:
    """Mean nDCG@10 of every method, and each router against every other method, paired over the same
    queries; ``strongest_static``: the best static selection on these very queries (an oracle choice among
    them, so the comparison favours the static side)."""
    out: dict[str, Any] = {"ndcg@10": {k: round(float(v.mean()), 4) for k, v in vals.items()}, "vs": {}}
    statics = [k for k in STATIC if k in vals]
    if statics:
        out["strongest_static"] = max(statics, key=lambda k: float(vals[k].mean()))
    for a in routers:
        out["vs"][a] = {b: {"delta": round(float((vals[a] - vals[b]).mean()), 4),
                            "p": float(f"{paired_p_value(vals[a], vals[b]):.3g}"),
                            "p_randomization": float(f"{paired_p_value(vals[a], vals[b], 'fisher'):.3g}")}
                        for b in vals if b != a}
    return out


def linear_baseline(view: ScoredCollection, settings: FitSettings) -> FixedSelection:
    """The learned linear combination of heads fitted on a router's training view (issue #35: the baseline a
    router must beat beside the strongest static selection): signed weights over the same pool the router routes
    (its size, depth budget, first stage and collection weighting), one weighting for every query."""
    return FixedSelection(fit_linear_on(view, settings.pool_size, use_first_stage=settings.use_first_stage,
                                        max_layer=settings.max_layer, balance=settings.balance))


def fitted(router: Router, info: dict[str, Any]) -> dict[str, Any]:
    """What a fitted router saw and its training figure (out of fold: not a test figure)."""
    t = router.config.training
    return {"trained_on": router.config.trained_on, "train_queries": t.get("train_queries"),
            "oof_ndcg@10": round(float(t["dev_ndcg@10"]), 4), "threshold": router.config.threshold}


def unseen(router: Router, held: str) -> None:
    """Refuse a test figure on a collection the router was trained on."""
    if held in router.config.trained_on:
        raise RouteheadError(f"{held} is among the router's training collections {router.config.trained_on}; "
                             f"its figure there is no test figure")


def other_orders(args: argparse.Namespace, spec: str, name: str, methods: dict[str, Method], scorer: Any,
                 out: dict[str, Any], by_order: dict[str, dict[str, list[np.ndarray]]],
                 routers: tuple[str, ...]) -> None:
    """The same methods (routers included, as fitted) on the held-out collection's stores in ``--eval-orders``,
    into ``out["orders"][order][name]`` and the per-order pools; a missing store is named in
    ``out["skipped_orders"]``."""
    for order in args.eval_orders:
        other, _, why = load_store(spec, argparse.Namespace(**{**vars(args), "doc_order": order}), scorer)
        if other is None:
            out.setdefault("skipped_orders", {})[f"{name} {order}"] = why
            continue
        ranking: dict[str, list[int]] = {}
        chosen: dict[str, dict] = {r: {} for r in routers}
        vals = score_all(other, methods, scorer, chosen, {"route-loco": ranking})
        for col in vals:
            by_order.setdefault(order, {}).setdefault(col, []).append(vals[col])
        qids = sorted(other.entries)
        out.setdefault("orders", {}).setdefault(order, {})[name] = {
            "queries": len(qids), **compare(vals, routers),
            "routing": {r: routing_diversity(chosen[r]) for r in routers},
            "per_query": {r: dict(zip(qids, np.round(vals[r], 6).tolist())) for r in routers},
            "ranking": {"route-loco": ranking}}
        print(json.dumps({"held_out": name, "order": order, "queries": len(other.entries),
                          **out["orders"][order][name]["ndcg@10"]}), flush=True)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dtype", default="float32", help="the stores' dtype (default float32, as they were scored)")
    ap.add_argument("--doc-order", default="shuffle", help="the stores' prompt order (one order a run)")
    ap.add_argument("--base", default="../shared/data/scifact:train", help="PATH[:SPLIT] every router trains on")
    ap.add_argument("--collections", nargs="+", default=COLLECTIONS, metavar="PATH[:SPLIT]",
                    help="each is held out once and trained on otherwise (split test unless given)")
    ap.add_argument("--eval-orders", nargs="*", default=[], metavar="ORDER",
                    help="also score every held-out collection's stored passes in these prompt orders (reverse, "
                         "input) with the same routers, fitted on --doc-order passes (a method is served in any "
                         "order; collections without such a store are skipped)")
    ap.add_argument("--top-k", type=int, default=SCORING.top_k)
    ap.add_argument("--max-doc-tokens", type=int, default=SCORING.max_doc_tokens)
    ap.add_argument("--max-queries", type=int, default=None, help="only the first N queries of each (quick runs)")
    ap.add_argument("--no-compute", action="store_true", help="stored passes only (skip collections without)")
    ap.add_argument("--recipe", default=None, help="the router file whose FitSettings every router is fitted with "
                    "(default the model's shipped router)")
    ap.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE", help="change a FitSettings field")
    ap.add_argument("--assets", nargs="*", default=[], metavar="METHOD=PATH",
                    help="the asset of a fixed method (static, core: heads; layers: a window) other than the shipped")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (1 when other jobs share the CPU)")
    ap.add_argument("--no-linear", action="store_true", help="skip the linear baseline (about half a LOCO run's time "
                    "on the embedded models: quick runs)")
    ap.add_argument("--out", default=None, help="default results/loco-<model>-<order>.json")
    ap.add_argument("--all-out", default=None, help="the router fitted on everything (default "
                    "results/router-<model>-multi-<order>.safetensors)")
    ap.add_argument("--base-out", default=None, help="also save route-base (fitted on the base alone: every held-out "
                    "figure above is a test figure of this router)")
    ap.add_argument("--ship", action="store_true", help="copy the router fitted on everything into the package "
                    "(router-<model>-multi.safetensors)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.time()
    base, scorer, why = load_store(args.base, args, None, split="train")
    if base is None:
        raise SystemExit(f"the base {args.base}: {why}")
    held: list[ScoredCollection] = []
    spec_of: dict[str, str] = {}
    skipped: dict[str, str] = {}
    for spec in args.collections:
        sc, scorer, why = load_store(spec, args, scorer)
        if sc is None:
            skipped[spec] = why
            print(f"skipped {spec}: {why}", flush=True)
        elif name_of(sc) == name_of(base):
            raise SystemExit(f"{spec} is the base; hold out other collections")
        else:
            held.append(sc)
            spec_of[name_of(sc)] = spec
    model = Path(scorer.lm.name).name  # a model folder's name, not its path, names the results
    ident = sc_identity(base, scorer)
    settings = recipe(args.recipe, scorer.lm.name, ident, args.set)
    assets = dict(a.split("=", 1) for a in args.assets)
    fixed: dict[str, Method] = {}
    for m in FIXED:
        try:
            fixed[m] = load_method(m, ident, heads=assets.get(m))
        except RouteheadError as exc:
            skipped[m] = str(exc)
            print(f"skipped method {m}: {exc}", flush=True)
    base_router, info = fit_router(base, scorer, settings)
    if args.base_out:
        base_router.save(args.base_out)
    out: dict[str, Any] = {"model": model, "doc_order": args.doc_order, "date": time.strftime("%Y-%m-%d"),
                           "command": "python bench/loco.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                           "base": name_of(base), "recipe": asdict(settings),
                           "collections": {name_of(sc): len(sc.entries) for sc in [base, *held]},
                           "skipped": skipped, "route-base": fitted(base_router, info),
                           # the train-side yardstick for route-base's out-of-fold figure: the fixed methods on the
                           # same stored base queries (in-sample for assets detected on them, so it favours them)
                           "base_fixed": {"queries": len(base.entries),
                                          "ndcg@10": {k: round(float(v.mean()), 4)
                                                      for k, v in score_all(base, fixed, scorer).items()}},
                           "held_out": {},
                           "note": "route-loco: fitted on the base and every other collection; route-base: on the "
                                   "base alone; static/core/layers: the shipped assets; oof_ndcg@10 are training "
                                   "figures (out of fold), every held-out figure a test figure of a router that "
                                   "never saw the collection"}
    routers = ("route-loco", "route-base")
    pooled: dict[str, list[np.ndarray]] = {}
    by_order: dict[str, dict[str, list[np.ndarray]]] = {}
    for h in held:
        name = name_of(h)
        view = merge_scored([base, *(sc for sc in held if sc is not h)])
        router, info = fit_router(view, scorer, settings)
        for r in (router, base_router):
            unseen(r, name)
        methods = {"route-loco": Route(router), "route-base": Route(base_router), **fixed,
                   **({} if args.no_linear else {"linear": linear_baseline(view, settings)})}
        chosen: dict[str, dict] = {r: {} for r in routers}
        ranking: dict[str, list[int]] = {}
        vals = score_all(h, methods, scorer, chosen, {"route-loco": ranking})
        qids = sorted(h.entries)
        for col in vals:
            pooled.setdefault(col, []).append(vals[col])
        out["held_out"][name] = {"queries": len(qids), "route-loco": fitted(router, info), **compare(vals, routers),
                                 "routing": {r: routing_diversity(chosen[r]) for r in routers},
                                 "per_query": {r: dict(zip(qids, np.round(vals[r], 6).tolist())) for r in routers},
                                 # route-loco's order of each query's candidates, for bench/headroom_table.py
                                 "ranking": {"route-loco": ranking}}
        print(json.dumps({"held_out": name, "queries": len(qids), **out["held_out"][name]["ndcg@10"]}), flush=True)
        other_orders(args, spec_of[name], name, methods, scorer, out, by_order, routers)
    if held:
        out["pooled"] = {"queries": sum(len(h.entries) for h in held),
                         **compare({k: np.concatenate(v) for k, v in pooled.items()}, routers)}
        print(json.dumps({"pooled": out["pooled"]["queries"], **out["pooled"]["ndcg@10"]}), flush=True)
        for order, cols in by_order.items():
            out["orders"][order]["pooled"] = {"queries": int(sum(len(v) for v in cols["bm25"])),
                                              **compare({k: np.concatenate(v) for k, v in cols.items()}, routers)}
        # the base collection's own test split stays its test: the shipped router never sees it
        train_all = [sc for sc in held if sc.collection.name != base.collection.name]
        kept = [name_of(sc) for sc in held if sc.collection.name == base.collection.name]
        everything, info = fit_router(merge_scored([base, *train_all]), scorer, settings)
        path = Path(args.all_out or f"results/router-{model}-multi-{args.doc_order}.safetensors")
        path.parent.mkdir(parents=True, exist_ok=True)
        everything.save(path)
        out["route-multi"] = {**fitted(everything, info), "saved": str(path),
                              "test_figures": (f"{', '.join(kept)}: its route-loco figures there are this router's "
                                               "(the same recipe and training collections)") if kept else
                                              "none: it has seen every collection here"}
        if args.ship:
            shipped = router_path(scorer.lm.name, "multi")[0]
            shutil.copyfile(path, shipped)
            out["route-multi"]["shipped"] = shipped.name
        print(f"router fitted on {len(everything.config.trained_on)} collection splits -> {path}", flush=True)
    out["seconds"] = round(time.time() - t0, 1)
    save_json(out, Path(args.out or f"results/loco-{model}-{args.doc_order}.json"))
    return out


if __name__ == "__main__":
    main()
