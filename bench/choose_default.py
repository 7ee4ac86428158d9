"""Choose the default re-ranker and prompt order on scifact train/dev: every method under every order.

    python bench/choose_default.py [--model smollm2-135m] [--dev 100]

Dev: the first ``--dev`` stored train queries that are scored in all three prompt orders (``routehead score
--split train --doc-order reverse|input|shuffle --max-queries 100``). Train: every other stored train query of
the shuffled store. Static heads (top-16 by detection) and routers (listwise and BCE, 5-fold cross-fitted) are
fitted on train only, in shuffled order (no position head can win by reading the first stage back), and then
evaluated on dev in each order: ``reverse`` (the references' published order), ``input`` (first-stage order),
``shuffle`` and ``both`` (debiased: the mean of the input and reverse scores; two passes).

The chosen default is the best (method, order) by dev nDCG@10 among the one-pass orders; ``both`` is reported
beside it with its cost (two passes). Writes results/default-choice-<model>.json and prints a markdown table.
Test splits are never read.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

from routehead.engine.model import load_model
from routehead.engine.scorer import HeadScorer
from routehead.evaluation.runs import evaluate, report, run_of
from routehead.evaluation.scores import method_scores
from routehead.offline.collect import score_collection
from routehead.offline.data import load_collection
from routehead.selection import load_method
from routehead.selection.heads import save_heads
from routehead.settings import DEFAULT_MAX_DOC_TOKENS, FitSettings
from routehead.training.detect import detect_heads
from routehead.training.fit import fit_router

ORDERS = ("reverse", "input", "shuffle")


def restrict(sc, qids):
    sc.entries = {q: sc.entries[q] for q in qids}
    sc.first_stage = {q: c for q, c in sc.first_stage.items() if q in sc.entries}
    return sc


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data", default="../shared/data/scifact")
    ap.add_argument("--split", default="train", help="train (choices are made on train/dev only)")
    ap.add_argument("--dev", type=int, default=100, help="dev queries (scored in all three orders)")
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    lm = load_model(args.model)
    scorer = HeadScorer(lm, max_doc_tokens=DEFAULT_MAX_DOC_TOKENS)
    coll = load_collection(args.data, args.split)
    scs = {o: score_collection(coll, None, scorer.settings(), top_k=20, doc_order=o) for o in ORDERS}
    everywhere = [q for q in coll.queries if all(q in scs[o].entries for o in ORDERS)]  # file order
    dev = everywhere[: args.dev]
    train = sorted(set(scs["shuffle"].entries) - set(dev))
    if not dev or len(train) < 10:
        raise SystemExit(f"need dev queries in all orders and >= 10 other shuffled train queries "
                         f"(have {len(dev)} dev, {len(train)} train)")
    print(f"{len(train)} train queries (shuffle), {len(dev)} dev queries (all orders)", flush=True)

    fit = restrict(score_collection(coll, None, scorer.settings(), top_k=20, doc_order="shuffle"), train)
    t0 = time.time()
    static, _ = detect_heads(fit, 16, train)
    routers = {}
    for name, objective in (("route", "listwise"), ("route-bce", "bce")):
        routers[name], _ = fit_router(fit, scorer, FitSettings(
            objective=objective, lr=3e-3, embed_layer=8, use_first_stage=False, label_max_heads=4, pool_size=32,
            folds=args.folds))
        print(name, "fitted, out-of-fold", round(routers[name].config.training["dev_ndcg@10"], 4), flush=True)
    fit_seconds = time.time() - t0

    with tempfile.TemporaryDirectory() as tmp:  # each method from the registry, over the assets fitted here
        heads = Path(tmp) / "heads.json"
        save_heads(heads, static, lm.identity())  # best first, as a shipped head set
        methods = {m: load_method(m, lm.identity(), heads=heads) for m in ("icr", "single", "static")}
        for name, router in routers.items():
            router.save(Path(tmp) / f"{name}.safetensors")
            methods[name] = load_method("route", lm.identity(), router=Path(tmp) / f"{name}.safetensors")
    for o in ORDERS:
        restrict(scs[o], dev)
    # order -> method -> qid -> scores (candidates in first-stage order)
    scores = {o: {m: method_scores(scs[o], method, scorer) for m, method in methods.items()} for o in ORDERS}
    runs = evaluate(scs["reverse"], ["bm25"])[0]
    for o in ORDERS:
        runs[f"position@{o}"] = evaluate(scs[o], ["position"])[0]["position"]
        for m, s in scores[o].items():
            runs[f"{m}@{o}"] = run_of(scs[o], s.__getitem__)
    for m in scores["reverse"]:
        a, b = scores["input"][m], scores["reverse"][m]
        runs[f"{m}@both"] = run_of(scs["reverse"], lambda q, a=a, b=b: (a[q] + b[q]) / 2)
    rep = report(scs["reverse"], runs, baselines=["bm25"])
    nd = {k: v["metrics"]["ndcg@10"] for k, v in rep["rerankers"].items()}
    one_pass = {k: v for k, v in nd.items() if "@" in k and not k.startswith("position") and not k.endswith("@both")}
    best = max(one_pass, key=one_pass.get)
    best_both = max((k for k in nd if k.endswith("@both")), key=nd.get)
    out = {"model": lm.name, "machine": platform.processor() or platform.machine(), "date": time.strftime("%Y-%m-%d"),
           "command": "python bench/choose_default.py " + " ".join(f"--{k.replace('_', '-')} {v}"
                                                                   for k, v in vars(args).items() if v is not None),
           "train_queries": len(train), "dev_queries": len(dev), "fit_seconds": round(fit_seconds, 1),
           "static_heads": [list(h) for h in static],
           "router_oof": {k: r.config.training["dev_ndcg@10"] for k, r in routers.items()},
           "ndcg@10": nd, "report": rep, "chosen_one_pass": best, "best_two_pass": best_both}
    Path("results").mkdir(exist_ok=True)
    Path(args.out or f"results/default-choice-{lm.name}.json").write_text(json.dumps(out, indent=1))
    methods = ["position", "icr", "single", "static", "route-bce", "route"]
    lines = [f"dev: {len(dev)} {coll.name} {coll.split} queries; fitted on {len(train)} others (shuffled order); "
             f"BM25 {nd['bm25']:.3f}", "", "| method | " + " | ".join(ORDERS + ("both",)) + " |",
             "|---|" + "---|" * 4]
    for m in methods:
        lines.append(f"| {m} | " + " | ".join(f"{nd[f'{m}@{o}']:.3f}" if f"{m}@{o}" in nd else "-"
                                               for o in ORDERS + ("both",)) + " |")
    lines.append(f"\nchosen (one pass): {best} {nd[best]:.3f}; best two-pass: {best_both} {nd[best_both]:.3f}")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
