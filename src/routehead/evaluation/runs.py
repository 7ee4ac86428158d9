"""Runs over stored forward passes: every registered method, and the baselines, from the same passes.

A method's run (:func:`method_run`) selects heads per query as it does live (:mod:`routehead.selection`) and
aggregates the stored token scores of that selection exactly as the live pass does
(:func:`routehead.offline.views.selection_scores`). Only the top ``top_k`` candidates are re-ranked; the rest
of the first stage (to depth 100) follows unchanged. Baselines that are no head selection (``bm25``,
``position``, ``dense``, ``oracle``) are in :mod:`routehead.evaluation.baselines`; :func:`evaluate` dispatches
a list of names over both, in one place.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from routehead.errors import RouteheadError
from routehead.evaluation.baselines import BASELINES
from routehead.evaluation.scores import method_scores
from routehead.metrics import compare_runs, evaluate_run, rank_order, run_from_ranking
from routehead.offline.collect import ScoredCollection
from routehead.selection import load_method
from routehead.selection.base import Asset, Method, Selection

Run = dict[str, dict[str, float]]


def run_of(sc: ScoredCollection, score_fn: Callable[[str], np.ndarray]) -> Run:
    """Re-ranked top-k (by ``score_fn(qid)``, candidates in first-stage order) followed by the untouched rest of
    the first stage."""
    ranking = {}
    for qid, cands in sc.first_stage.items():
        if qid not in sc.entries:
            ranking[qid] = [d for d, _ in cands]
            continue
        top = sc.entries[qid].doc_ids
        order = rank_order(score_fn(qid))
        reranked = set(top)
        rest = [d for d, _ in cands if d not in reranked]
        ranking[qid] = [top[i] for i in order] + rest
    return run_from_ranking(ranking)


def method_run(sc: ScoredCollection, method: Method, scorer: Any = None,
               selections: dict[str, Selection] | None = None) -> Run:
    """The run of a registered method over the stored passes (:func:`method_scores`, ranked)."""
    scores = method_scores(sc, method, scorer, selections=selections)
    return run_of(sc, lambda qid: scores[qid])


def evaluate(sc: ScoredCollection, names: Sequence[str], scorer: Any = None, router: Asset = None,
             heads: Asset = None, training_figures: bool = False) -> tuple[dict[str, Run], dict[str, Any]]:
    """Runs of ``names`` (baselines and registered methods) and extra facts (mean routed heads). A method
    loads ``router``/``heads`` or the assets shipped for the model; ``oracle`` searches the routed pool when a
    router was evaluated before it, else the 64 best heads alone. A router evaluated on a collection split it
    was trained on is refused (:func:`trained_here`), unless ``training_figures``: then its run is kept and named
    under ``extra["training_figures"]``, so no report passes it off as a test figure."""
    runs: dict[str, Run] = {}
    extra: dict[str, Any] = {}
    pool = None
    for name in names:
        if name in BASELINES:
            runs[name] = run_of(sc, BASELINES[name](sc, pool))
            continue
        method = load_method(name, sc_identity(sc, scorer), router=router, heads=heads)
        seen = trained_here(method, sc)
        if seen and not training_figures:
            raise RouteheadError(
                f"{seen}: its figure there is no test figure; evaluate a router that never saw it (another shipped "
                f"variant, or your own from `routehead train`), hold the collection out (bench/loco.py), or pass "
                f"training_figures / --training-figures to report it named as a training figure")
        if seen:
            extra.setdefault("training_figures", {})[name] = seen
        chosen: dict[str, Selection] = {}
        runs[name] = method_run(sc, method, scorer, chosen)
        if method.needs == "router":
            pool = method.router.config.pool_heads
            sizes = [len(s.heads.heads or ()) + int(s.first_stage_weight > 0) for s in chosen.values()]
            extra[f"{name}_mean_heads"] = sum(sizes) / max(len(sizes), 1)
    return runs, extra


def trained_here(method: Method, sc: ScoredCollection) -> str | None:
    """Why ``method``'s figure on ``sc`` would be a training figure (its router was trained on this collection
    split's judged queries, as the shipped default router was on scifact train and five other collections), or
    None: a figure that no report may pass off as a test figure."""
    cfg = getattr(getattr(method, "router", None), "config", None)
    here = f"{sc.collection.name}/{sc.collection.split}"
    if cfg is not None and here in cfg.trained_on:
        return f"the router was trained on {here}'s judged queries (it saw {', '.join(cfg.trained_on)})"
    return None


IDENTITY_KEYS = ("model", "architecture", "num_layers", "num_heads", "num_kv_heads", "hidden_size")


def sc_identity(sc: ScoredCollection, scorer: Any = None) -> dict[str, Any]:
    """The identity of the model the stored passes were made with (a method's assets must match it): the
    scorer's, or the store's own record of it (so a method can be evaluated from a store without the model)."""
    if scorer is not None:
        return scorer.lm.identity()
    return {k: sc.settings.get(k) for k in IDENTITY_KEYS}


def report(sc: ScoredCollection, runs: dict[str, Run], baselines: Sequence[str] = ("bm25", "icr"),
           metrics: Sequence[str] = ("ndcg@10", "mrr@10", "recall@10", "recall@100")) -> dict[str, Any]:
    """Metrics of every run and paired t-tests (nDCG@10) against the baselines present."""
    qrels = {q: r for q, r in sc.collection.qrels.items() if q in sc.first_stage}
    out: dict[str, Any] = {"dataset": sc.collection.name, "split": sc.collection.split, "n_queries": len(qrels),
                           "top_k": sc.settings.get("top_k"), "model": sc.settings.get("model"), "rerankers": {}}
    bases = [b for b in baselines if b in runs]
    sig = compare_runs(qrels, runs, bases) if bases else {"runs": {}}
    for name, run in runs.items():
        out["rerankers"][name] = {"metrics": evaluate_run(qrels, run, metrics),
                                  "vs": sig["runs"].get(name, {}).get("vs", {})}
    return out


def format_table(rep: dict[str, Any]) -> str:
    names = list(rep["rerankers"])
    metrics = list(next(iter(rep["rerankers"].values()))["metrics"])
    lines = [f"{rep['dataset']} ({rep['split']}, {rep['n_queries']} queries, top-{rep['top_k']}, {rep['model']})",
             "reranker".ljust(10) + "".join(m.rjust(12) for m in metrics) + "  significance (nDCG@10, p<0.05)"]
    for n in names:
        r = rep["rerankers"][n]
        marks = " ".join(f"{'>' if v['better'] else '<' if v['worse'] else '='}{b}" for b, v in r["vs"].items())
        lines.append(n.ljust(10) + "".join(f"{r['metrics'][m]:12.4f}" for m in metrics) + "  " + marks)
    return "\n".join(lines)


def save_json(obj: Any, path: str | Path) -> None:
    import json

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(obj, indent=1))
