"""Evaluation harness: every re-ranker as a selection over the same stored forward passes, metrics with ranx.

Re-rankers: ``bm25`` (first-stage order), ``position`` (the prompt position alone, later = better: what
position bias can give without reading), ``dense`` (MiniLM cosine), ``icr`` (all heads), ``static`` (a detected
head set), ``single`` (the best head on the detection set), ``route`` (RouteHead), ``oracle`` (analysis only:
each query's greedy label set over the pool, chosen with its own judgments). Every attention re-ranker's
scores come from the stored token scores, aggregated as inference does (:mod:`routehead.heads`). Only the top
``top_k`` candidates are re-ranked; the rest of the first stage (to depth 100) follows unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from routehead.collect import ScoredCollection, store_root
from routehead.errors import RouteheadError
from routehead.heads import Head, per_head_quality, rank_order, set_scores, spans_of, top_heads, zscore
from routehead.labels import Query, doc_scores, greedy_label, prior_quality
from routehead.metrics import compare_runs, evaluate_run, run_from_ranking
from routehead.router import Router

RERANKERS = ("bm25", "position", "dense", "icr", "static", "single", "route", "oracle")

Run = dict[str, dict[str, float]]


def _gains(sc: ScoredCollection, qid: str, doc_ids: Sequence[str]) -> tuple[np.ndarray, list[float]]:
    judged = sc.collection.qrels.get(qid, {})
    return np.array([max(judged.get(d, 0), 0) for d in doc_ids], dtype=np.float64), list(judged.values())


def first_stage_scores(sc: ScoredCollection, qid: str) -> np.ndarray:
    top = sc.entries[qid].doc_ids
    fs = dict(sc.first_stage[qid])
    return np.array([fs[d] for d in top], dtype=np.float64)


def _tokens(sc: ScoredCollection, qid: str):
    t = sc.entries[qid].tokens
    if t is None:
        raise RouteheadError(f"the store {sc.settings.get('collection')}/{sc.settings.get('split')} has no token "
                             f"scores (made by an older routehead); score the collection again")
    return t


def head_rows(sc: ScoredCollection, qid: str, heads: Sequence[Head]) -> torch.Tensor:
    """float32 token rows ``[len(heads), T]`` of ``heads`` for one stored query."""
    t = _tokens(sc, qid)
    index = {(int(a), int(b)): i for i, (a, b) in enumerate(t.heads.tolist())}
    missing = [h for h in heads if tuple(h) not in index]
    if missing:
        raise RouteheadError(f"heads {missing[:3]} have no stored token scores")
    return torch.from_numpy(t.decoded([index[tuple(h)] for h in heads]))


def queries_for(sc: ScoredCollection, pool: Sequence[Head], use_first_stage: bool = False,
                qids: Sequence[str] | None = None) -> list[Query]:
    """Label-search / training view of stored queries: the pool's token rows, single-head scores, judgments."""
    out = []
    for qid in qids if qids is not None else sorted(sc.entries):
        e = sc.entries[qid]
        gains, ideal = _gains(sc, qid, e.doc_ids)
        fs = zscore(first_stage_scores(sc, qid)[None])[0] if use_first_stage else None
        single = np.stack([e.calibrated[lay, h] for lay, h in pool]).astype(np.float64)
        out.append(Query(qid, head_rows(sc, qid, pool), spans_of(_tokens(sc, qid).counts), single, gains, ideal,
                         fs))
    return out


def detect_heads(sc: ScoredCollection, top: int = 16, qids: Sequence[str] | None = None, k: int = 10,
                 max_layer: int | None = None) -> tuple[list[Head], np.ndarray]:
    """QRHead-style detection: each head's mean nDCG@k alone on ``qids``; the ``top`` best heads.

    ``max_layer``: choose only among heads of layers ``<= max_layer`` (the quality map is still returned whole),
    so that a pass scoring the chosen heads can stop after that layer: a depth budget traded against quality.
    """
    ids = list(qids) if qids is not None else sorted(sc.entries)
    qual = []
    for qid in ids:
        e = sc.entries[qid]
        gains, ideal = _gains(sc, qid, e.doc_ids)
        qual.append(per_head_quality(e.calibrated, gains, ideal, k))  # not computed: -inf, ranks last
    q = np.mean(qual, axis=0)
    if max_layer is not None and not 0 <= max_layer < q.shape[0]:
        raise RouteheadError(f"max_layer {max_layer} is not a layer of this model (0..{q.shape[0] - 1})")
    return top_heads(q if max_layer is None else q[: max_layer + 1], top), q


def position_correlation(sc: ScoredCollection, qids: Sequence[str] | None = None) -> np.ndarray:
    """Per head ``[layers, heads]``: mean Spearman correlation between its scores and the prompt position
    (positive: the head favours documents near the query, i.e. late in the prompt)."""
    from scipy.stats import spearmanr

    vals = []
    for qid in qids if qids is not None else sorted(sc.entries):
        e = sc.entries[qid]
        pos = _tokens(sc, qid).positions.astype(np.float64)
        L, H, D = e.calibrated.shape
        flat = e.calibrated.reshape(L * H, D)
        r = np.array([spearmanr(x, pos).statistic if np.ptp(x) > 0 else 0.0 for x in flat])
        vals.append(np.nan_to_num(r).reshape(L, H))
    return np.mean(vals, axis=0)


def _run(sc: ScoredCollection, score_fn: Callable[[str], np.ndarray]) -> Run:
    """Re-ranked top-k followed by the untouched rest of the first stage."""
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


def icr_scores(sc: ScoredCollection, qid: str) -> np.ndarray:
    t = _tokens(sc, qid)
    return set_scores(torch.from_numpy(t.total)[None], spans_of(t.counts))


def make_run(sc: ScoredCollection, method: str, heads: Sequence[Head] | None = None, router: Router | None = None,
             embeddings: dict[str, torch.Tensor] | None = None, dense_scores: dict[str, np.ndarray] | None = None,
             routed_sizes: list[int] | None = None, pool: Sequence[Head] | None = None) -> Run:
    """The run of one re-ranker over a scored collection."""
    if method == "bm25":
        return run_from_ranking({q: [d for d, _ in c] for q, c in sc.first_stage.items()})
    if method == "position":
        return _run(sc, lambda q: _tokens(sc, q).positions.astype(np.float64))
    if method == "icr":
        return _run(sc, lambda q: icr_scores(sc, q))
    if method in ("static", "single"):
        if not heads:
            raise ValueError(f"{method} needs a head set")
        return _run(sc, lambda q: set_scores(head_rows(sc, q, heads), spans_of(_tokens(sc, q).counts)))
    if method == "dense":
        assert dense_scores is not None
        return _run(sc, lambda q: dense_scores[q])
    if method == "oracle":
        if not pool:
            raise ValueError("oracle needs a pool of heads")
        qs = {q.qid: q for q in queries_for(sc, pool)}
        prior = prior_quality(list(qs.values()))

        def oracle(qid: str) -> np.ndarray:
            chosen, _ = greedy_label(qs[qid], prior)
            return doc_scores(qs[qid], chosen or [int(np.argmax(prior))])
        return _run(sc, oracle)
    if method == "route":
        assert router is not None and embeddings is not None
        cfg = router.config
        qs = {q.qid: q for q in queries_for(sc, cfg.pool_heads, cfg.use_first_stage)}

        def routed(qid: str) -> np.ndarray:
            r = router.route(embeddings[qid])
            if routed_sizes is not None:
                routed_sizes.append(len(r.signals))
            return doc_scores(qs[qid], r.signals, r.signal_weights)
        return _run(sc, routed)
    raise ValueError(f"unknown re-ranker {method!r}; use one of {RERANKERS}")


def query_embeddings(sc: ScoredCollection, scorer: Any, layer: int, pooling: str = "mean",
                     qids: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
    """Router inputs for the stored queries, cached next to the store (a short pass per query)."""
    from safetensors.torch import load_file, save_file

    name = f"emb-{scorer.lm.name}-L{layer}-{pooling}.safetensors".replace("/", "_")
    path = store_root() / sc.collection.name / sc.collection.split / name
    cached = load_file(str(path)) if path.is_file() else {}
    want = list(qids) if qids is not None else sorted(sc.entries)
    missing = [q for q in want if q not in cached]
    if missing:
        for q in missing:
            cached[q] = scorer.query_embedding(sc.collection.queries[q], layer, pooling)[None]
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in cached.items()}, str(path))
    return {q: cached[q] for q in want}


def dense_scores(sc: ScoredCollection) -> dict[str, np.ndarray]:
    from routehead.dense import DenseReranker

    qids = sorted(sc.entries)
    model = DenseReranker()
    docs = [[sc.collection.doc_text(d) for d in sc.entries[q].doc_ids] for q in qids]
    out = model.score_many([sc.collection.queries[q] for q in qids], docs)
    return {q: np.asarray(s) for q, s in zip(qids, out)}


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
