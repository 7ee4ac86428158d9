"""Which prompt order should each method be served in? Chosen on scifact train queries that no head set, window
or router saw (issue #35 item 5).

    python bench/serving_order.py --model smollm2-135m          # stored passes only
    python bench/serving_order.py --orders reverse shuffle --root reverse=results/cache \
        --root shuffle=/root/routehead-store                     # each order's store where it lives
    python bench/serving_order.py --from-json --record src/routehead/assets/router-smollm2-135m-fs.safetensors=route+fs

Held-out queries: the scifact train queries stored in every order of ``--orders`` (a store root per order with
``--root ORDER=PATH``, else ROUTEHEAD_STORE). Every
method is fitted on the *other* stored shuffled train queries with the shipped recipe: QRHead-16 (``static``),
the single best head, CoRe-8 (temperature 1.0, prune 0.25), the layer window (width 1), and the routers (the
shipped listwise recipe, with and without the first-stage score as a routable signal: ``route``, ``route+fs``;
read back from the shipped router files as bench/loco.py does; ``route-prompt``: ``route+fs`` reading the query
inside the prompt, as SmolLM2's default router does, each order's embedding from that order's own prompt). Then each
is scored on the held-out queries in each order: mean nDCG@10, and for each order the paired p-value against the
reversed order (the default serving order). BM25 and position-only rows give the scale. Writes
results/serving-order-<model>.json. ``--record`` writes a method's best order into a router file, which a
``Reranker`` without ``doc_order`` then serves it in.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from loco import per_query, recipe  # noqa: E402

from routehead.engine.order import prompt_order  # noqa: E402
from routehead.errors import RouteheadError  # noqa: E402
from routehead.evaluation.runs import save_json, sc_identity  # noqa: E402
from routehead.metrics import ndcg_at_k, paired_p_value  # noqa: E402
from routehead.offline.job import ScoreJob  # noqa: E402
from routehead.offline.views import first_stage_scores, gains, tokens_of  # noqa: E402
from routehead.selection import load_method  # noqa: E402
from routehead.selection.route import Route  # noqa: E402
from routehead.training.detect import detect_core, detect_heads, detect_window  # noqa: E402
from routehead.training.fit import fit_router  # noqa: E402

ORDERS = ("reverse", "shuffle", "input")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data", default="../shared/data/scifact")
    ap.add_argument("--split", default="train")
    ap.add_argument("--orders", nargs="+", default=list(ORDERS), choices=ORDERS)
    ap.add_argument("--root", action="append", default=[], help="ORDER=PATH: where that order's store lives")
    ap.add_argument("--record", nargs="*", default=[], metavar="ROUTER=METHOD",
                    help="write METHOD's best order into the router file ROUTER (its serving_order: a Reranker "
                    "without doc_order serves it there), e.g. src/routehead/assets/router-smollm2-135m-fs."
                    "safetensors=route+fs")
    ap.add_argument("--shipped", nargs="*", default=None, metavar="ROUTER",
                    help="score the shipped assets as they are (no re-fitting; for a model without a large shuffled "
                    "train store): ICR, QRHead, the single head, CoRe, the window, and the routers named (shipped "
                    "variant names, 'default' the default router); their train figures are in-sample where an asset "
                    "was detected on these queries (the choice is still made on train)")
    ap.add_argument("--from-json", action="store_true", help="with --record: take the orders from the last run's "
                    "results/serving-order-<model>.json instead of running again")
    args = ap.parse_args()
    if args.from_json:
        name = f"serving-order-{args.model}{'-shipped' if args.shipped is not None else ''}.json"
        record(json.loads((Path("results") / name).read_text()), args.record)
        return
    if "shuffle" not in args.orders and args.shipped is None:
        raise SystemExit("--orders must include shuffle: the methods are fitted on the shuffled passes")
    default_root = os.environ.get("ROUTEHEAD_STORE", "results/cache")
    roots = dict(r.split("=", 1) for r in args.root)
    stores, scorer = {}, None
    for o in args.orders:
        os.environ["ROUTEHEAD_STORE"] = roots.get(o, default_root)
        stores[o], scorer = ScoreJob(data=args.data, split=args.split, model=args.model, dtype="float32",
                                     progress=False).with_options(doc_order=o).run(compute=False, scorer=scorer)
        for q, e in stores[o].entries.items():  # a store whose passes are not in its order would mislead
            want = prompt_order(len(e.doc_ids), o, q)  # the store seeds a shuffle by the query id
            if list(np.argsort(e.tokens.positions)) != want:
                raise SystemExit(f"{o} store under {roots.get(o, default_root)}: query {q} was not scored in {o} "
                                 f"order (positions {e.tokens.positions.tolist()[:6]}...)")
    # query embeddings are cached beside the shuffled store (they do not depend on the order)
    os.environ["ROUTEHEAD_STORE"] = roots.get("shuffle", default_root)
    held = sorted(set.intersection(*(set(sc.entries) for sc in stores.values())))
    if args.shipped is not None:
        shipped_run(args, stores, scorer, held, roots, default_root)
        return
    train_sc = replace(stores["shuffle"], entries={q: e for q, e in stores["shuffle"].entries.items()
                                                   if q not in held})
    fit_ids = sorted(train_sc.entries)
    print(f"held out {len(held)}, fitting on {len(fit_ids)}", flush=True)
    ident = sc_identity(train_sc, scorer)
    methods = {"icr": load_method("icr", ident),
               "static": load_method("static", ident, heads=detect_heads(train_sc, 16, fit_ids)[0]),
               "single": load_method("single", ident, heads=detect_heads(train_sc, 1, fit_ids)[0]),
               "core": load_method("core", ident, heads=detect_core(train_sc, 8, 1.0, 0.25, qids=fit_ids)[0]),
               "layers": load_method("layers", ident, heads=detect_window(train_sc, 1, fit_ids)[0])}
    routers = {}
    for name, fs, pooling in (("route", False, None), ("route+fs", True, None), ("route-prompt", True, "prompt-mean")):
        settings = replace(recipe(None, args.model, ident, []), use_first_stage=fs)
        if pooling:  # the query read inside each order's own prompt (SmolLM2's default router's embedding)
            settings = replace(settings, pooling=pooling)
        routers[name], _ = fit_router(train_sc, scorer, settings)
        methods[name] = Route(routers[name])
        print(name, "fitted, out-of-fold nDCG@10", round(routers[name].config.training["dev_ndcg@10"], 4),
              flush=True)
    table = summary(scored(stores, methods, scorer, held, roots, default_root))
    res = {"model": args.model, "collection": Path(args.data).name, "split": args.split,
           "orders": args.orders, "held_out_queries": len(held), "fit_queries": len(fit_ids),
           "date": datetime.date.today().isoformat(),
           "routers_oof": {k: round(float(r.config.training["dev_ndcg@10"]), 4) for k, r in routers.items()},
           "methods": table}
    save_json(res, Path("results") / f"serving-order-{args.model}.json")
    record(res, args.record)


def scored(stores: dict, methods: dict, scorer: object, held: list[str], roots: dict,
           default_root: str) -> dict[str, dict[str, np.ndarray]]:
    """Per-query nDCG@10 of every method (and BM25's and the position's order) on ``held`` in every order."""
    vals: dict[str, dict[str, np.ndarray]] = {}
    for o, sc in stores.items():
        os.environ["ROUTEHEAD_STORE"] = roots.get(o, default_root)  # in-prompt embeddings live beside their store
        vals.setdefault("bm25", {})[o] = np.array(
            [float(ndcg_at_k(first_stage_scores(sc, q)[None], *gains(sc, q, sc.entries[q].doc_ids), 10)[0])
             for q in held])
        vals.setdefault("position", {})[o] = np.array(
            [float(ndcg_at_k(tokens_of(sc, q).positions.astype(float)[None], *gains(sc, q, sc.entries[q].doc_ids),
                             10)[0]) for q in held])
        for name, m in methods.items():
            vals.setdefault(name, {})[o] = per_query(sc, m, scorer, held)
    return vals


def summary(vals: dict[str, dict[str, np.ndarray]]) -> dict[str, dict]:
    """Each method's mean per order, its best order (the rule) and each order's paired p against reversed."""
    table = {}
    for name, by in vals.items():
        best = max(by, key=lambda o: by[o].mean())
        table[name] = {"ndcg@10": {o: round(float(v.mean()), 4) for o, v in by.items()}, "best": best,
                       "p_vs_reverse": {o: float(f"{paired_p_value(v, by['reverse']):.3g}")
                                        for o, v in by.items() if o != "reverse" and "reverse" in by}}
        print(name, json.dumps(table[name]), flush=True)
    return table


def shipped_run(args: argparse.Namespace, stores: dict, scorer: object, held: list[str], roots: dict,
                default_root: str) -> None:
    """``--shipped``: the shipped assets scored as they are on the held-out queries in every order."""
    ident = sc_identity(next(iter(stores.values())), scorer)
    methods = {}
    for m in ("icr", "static", "single", "core", "layers"):
        try:
            methods[m] = load_method(m, ident)
        except RouteheadError as exc:
            print(f"{m} left out: {exc}", flush=True)
    for r in args.shipped:
        methods["route" if r == "default" else f"route-{r}"] = load_method("route", ident,
                                                                          router=None if r == "default" else r)
    print(f"held out {len(held)} (shipped assets, no re-fitting)", flush=True)
    res = {"model": args.model, "collection": Path(args.data).name, "split": args.split, "orders": args.orders,
           "held_out_queries": len(held), "fit_queries": None, "date": datetime.date.today().isoformat(),
           "note": "shipped assets as they are: in-sample on queries they were detected or fitted on",
           "assets": {k: {kk: str(vv)[:200] for kk, vv in m.info().items()} for k, m in methods.items()},
           "methods": summary(scored(stores, methods, scorer, held, roots, default_root))}
    save_json(res, Path("results") / f"serving-order-{args.model}-shipped.json")
    record(res, args.record)


def record(res: dict, specs: list[str]) -> None:
    """Each ``FILE=METHOD``: the file's serving order for METHOD set to METHOD's best order in ``res`` (a router
    file's ``serving_order``; a head-set or window JSON's ``serving_order`` map; heads and weights unchanged). The
    rule, fixed before any test figure: the order with the best mean nDCG@10 on the held-out train queries."""
    from routehead.selection.heads import record_serving_order
    from routehead.selection.router import load_router

    for spec in specs:
        path, method = spec.split("=", 1)
        if path.endswith(".json"):
            record_serving_order(path, method, res["methods"][method]["best"])
            print(f"{path}: {method} served in {res['methods'][method]['best']} order", flush=True)
            continue
        router = load_router(path)
        router.config.serving_order = res["methods"][method]["best"]
        router.save(path)
        print(f"{path}: served in {router.config.serving_order} order ({method}: "
              f"{res['methods'][method]['ndcg@10']})", flush=True)


if __name__ == "__main__":
    main()
