"""Long documents: truncation against chunking (MaxP), every method, in the three prompt orders, on scifact train.

    nohup nice -n 10 python bench/chunking.py --threads 1 > results/chunking-smollm2-135m.log 2>&1 &
    python bench/chunking.py --no-compute          # the table from what is stored so far

Setting: the project's evaluation (``routehead evaluate``): BM25 top-20 candidates of the first ``--max-queries``
scifact **train** queries (choices are made on train only; test is refused), documents ``title + "\\n" + text``,
the default model, ICR and the shipped static heads and router, scored from stored passes (one pass per query,
order and setting serves every method). ``--chunks 1`` is truncation to ``max_doc_tokens`` (160; today's default);
``k`` > 1 splits a longer document into up to k consecutive chunks of 160 tokens, each its own passage in the
prompt, the document scored by its best chunk (MaxP; :mod:`routehead.engine.prompt`).

Resumable: queries are scored in blocks of ``--block`` into the store (``results/cache``, one store per order and
setting), every setting of a block before the next block, so an interrupted run keeps every finished block and
the table is always over the queries stored under every setting. The JSON (``--out``) is rewritten after each
block: per (method, order, setting) mean and median nDCG@10, paired differences against truncation (mean, 95%
bootstrap interval over queries, paired t-test and randomization p-values), the passes' cost, and how many
candidates are longer than ``max_doc_tokens``.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from routehead.engine.model import load_model
from routehead.engine.scorer import HeadScorer
from routehead.evaluation.runs import evaluate
from routehead.metrics import paired_p_value, per_query
from routehead.offline.bm25 import first_stage
from routehead.offline.collect import ScoredCollection, score_collection, select_queries, store_root, store_settings
from routehead.offline.data import load_collection
from routehead.offline.store import HeadScoreStore
from routehead.settings import SCORING

ORDERS = ("reverse", "input", "shuffle")


def machine() -> str:
    """The CPU as ``lscpu`` names it, with its core count."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        info = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
        return f"{info.get('Model name', '?').strip()}, {info.get('CPU(s)', '?').strip()} CPUs"
    except (OSError, subprocess.CalledProcessError):
        return platform.processor() or platform.machine()


def bootstrap(diff: np.ndarray, n: int = 10_000, seed: int = 0) -> list[float]:
    """95% percentile bootstrap interval of the mean of paired differences (queries resampled)."""
    rng = np.random.default_rng(seed)
    means = diff[rng.integers(0, len(diff), size=(n, len(diff)))].mean(1)
    return [float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))]


def long_candidates(scorers: dict[int, HeadScorer], sc: ScoredCollection, qids: list[str], top_k: int
                    ) -> dict[str, Any]:
    """How many candidates are longer than ``max_doc_tokens`` (what truncation cuts), their mean length, and per
    setting the mean prompt tokens and the queries whose prompt needs more than one window (first-stage order)."""
    builder = scorers[1].builder
    lengths = []
    prompts: dict[int, list[tuple[int, int]]] = {k: [] for k in scorers}
    for q in qids:
        ids = [d for d, _ in sc.first_stage[q][:top_k]]
        texts = [sc.collection.prompt_text(d, builder.layout) for d in ids]
        lengths += [len(builder._encode(t.strip(), special=False)) for t in texts]
        for k, s in scorers.items():
            _, chunks, windows, fixed, per_doc = s.plan(sc.collection.queries[q], texts)
            tokens = sum(fixed + sum(chunks.lengths[j] + per_doc for j in w) for w in windows)
            prompts[k].append((tokens, len(windows)))
    a = np.asarray(lengths)
    limit = builder.max_doc_tokens
    return {"candidates": int(a.size), "longer_than_max_doc_tokens": float((a > limit).mean()),
            "longer_than_2x": float((a > 2 * limit).mean()), "longer_than_3x": float((a > 3 * limit).mean()),
            "mean_tokens": float(a.mean()), "median_tokens": float(np.median(a)),
            "prompt_tokens_mean": {str(k): float(np.mean([t for t, _ in v])) for k, v in prompts.items()},
            "queries_with_several_windows": {str(k): int(sum(w > 1 for _, w in v)) for k, v in prompts.items()}}


def summary(per_q: dict[str, dict[str, dict[int, np.ndarray]]], chunks: list[int]) -> dict[str, Any]:
    """Per method and order: each setting's mean/median nDCG@10 and its paired difference against truncation."""
    out: dict[str, Any] = {}
    for method, by_order in per_q.items():
        for order, by_k in by_order.items():
            base = by_k[chunks[0]]
            cell: dict[str, Any] = {}
            for k, v in by_k.items():
                row: dict[str, Any] = {"mean": float(v.mean()), "median": float(np.median(v))}
                if k != chunks[0]:
                    d = v - base
                    row.update({"diff_mean": float(d.mean()), "diff_median": float(np.median(d)),
                                "diff_ci95": bootstrap(d), "wins": int((d > 0).sum()), "losses": int((d < 0).sum()),
                                "p_ttest": paired_p_value(v, base, "student"),
                                "p_randomization": paired_p_value(v, base, "randomization")})
                cell[str(k)] = row
            out.setdefault(method, {})[order] = cell
    return out


def table(res: dict[str, Any], chunks: list[int]) -> str:
    """The markdown table of BENCHMARKS.md: nDCG@10 per setting, and each chunked setting's paired difference."""
    head = ["method", "order", "n"] + [f"k={k}" if k > 1 else "truncation" for k in chunks]
    head += [f"k={k} - trunc. (95% CI, p)" for k in chunks[1:]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for method, by_order in res["summary"].items():
        for order, cell in by_order.items():
            row = [method, order, str(res["n_queries"])] + [f"{cell[str(k)]['mean']:.3f}" for k in chunks]
            for k in chunks[1:]:
                c = cell[str(k)]
                row.append(f"{c['diff_mean']:+.3f} ({c['diff_ci95'][0]:+.3f}, {c['diff_ci95'][1]:+.3f}; "
                           f"p={c['p_ttest']:.2g})")
            lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data", default="../shared/data/scifact")
    ap.add_argument("--split", default="train", help="train (scifact test is never used for a choice)")
    ap.add_argument("--max-queries", type=int, default=100, help="the first N queries of the split")
    ap.add_argument("--chunks", type=int, nargs="+", default=[1, 2, 3], help="max_chunks_per_doc settings; 1 = "
                    "truncation, the baseline of the paired differences")
    ap.add_argument("--orders", nargs="+", default=list(ORDERS), choices=list(ORDERS))
    ap.add_argument("--methods", nargs="+", default=["icr", "static", "route"])
    ap.add_argument("--block", type=int, default=10, help="queries scored per setting before the next setting")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-compute", action="store_true", help="only the queries already stored under every setting")
    ap.add_argument("--out", default=None, help="default results/chunking-<model>.json")
    args = ap.parse_args()
    if args.split == "test":
        raise SystemExit("chunking is chosen on train; the test split is not read here")
    if args.chunks[0] != 1:
        raise SystemExit("--chunks must start with 1 (truncation, the baseline)")
    torch.set_num_threads(args.threads)
    lm = load_model(args.model)
    coll = load_collection(args.data, args.split)
    scorers = {k: HeadScorer(lm, max_doc_tokens=SCORING.max_doc_tokens, max_chunks_per_doc=k) for k in args.chunks}
    qids = select_queries(coll, args.max_queries)
    fs = first_stage(coll, SCORING.top_k)
    qids = [q for q in qids if fs[q]]  # a query without candidates has nothing to score
    out_path = Path(args.out or f"results/chunking-{lm.name}.json")
    seconds: dict[str, float] = {}
    blocks = [qids[i:i + args.block] for i in range(0, len(qids), args.block)]
    for b, block in enumerate([] if args.no_compute else blocks):
        for order in args.orders:
            for k, scorer in scorers.items():
                t0 = time.perf_counter()
                score_collection(coll, scorer, scorer.settings(), top_k=SCORING.top_k, doc_order=order, only=block,
                                 progress=False)
                key = f"{order}/{k}"
                seconds[key] = seconds.get(key, 0.0) + time.perf_counter() - t0
        print(f"{time.strftime('%H:%M:%S')} block {b + 1}/{len(blocks)} done", flush=True)
        report(args, lm, coll, scorers, qids, out_path, seconds)
    report(args, lm, coll, scorers, qids, out_path, seconds)


def report(args: argparse.Namespace, lm: Any, coll: Any, scorers: dict[int, HeadScorer], qids: list[str],
           out_path: Path, seconds: dict[str, float]) -> None:
    """Evaluate the queries stored under every setting and order; write the JSON and print the table."""
    settings = [(o, k) for o in args.orders for k in scorers]
    stored = {(o, k): set(HeadScoreStore(store_root(), store_settings(scorers[k].settings(), coll, SCORING.top_k,
                                                                      o)).done()) for o, k in settings}
    done = [q for q in qids if all(q in s for s in stored.values())]
    if not done:
        print("no query is stored under every setting yet", flush=True)
        return
    qrels = {q: coll.qrels[q] for q in done if q in coll.qrels}
    per_q: dict[str, dict[str, dict[int, np.ndarray]]] = {}
    bm25 = None
    for order, k in settings:  # one store in memory at a time (a chunked one is a few hundred MB)
        sc = score_collection(coll, None, scorers[k].settings(), top_k=SCORING.top_k, doc_order=order, only=done)
        runs, _ = evaluate(sc, ["bm25", *args.methods], scorers[k])
        for m in args.methods:
            pq = per_query(qrels, runs[m], "ndcg@10")
            per_q.setdefault(m, {}).setdefault(order, {})[k] = np.array([pq[q] for q in qrels])
        bm25 = per_query(qrels, runs["bm25"], "ndcg@10")
        if (order, k) == settings[0]:
            cands = long_candidates(scorers, sc, done, SCORING.top_k)
        del sc, runs
    res: dict[str, Any] = {
        "model": lm.name, "collection": coll.name, "split": coll.split, "n_queries": len(qrels),
        "top_k": SCORING.top_k, "max_doc_tokens": SCORING.max_doc_tokens, "chunks": args.chunks,
        "orders": args.orders, "methods": args.methods, "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": machine(), "torch_threads": torch.get_num_threads(),
        "command": "nice -n 10 python bench/chunking.py " + " ".join(
            f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"
            for k, v in vars(args).items() if v not in (None, False)),
        "bm25_ndcg@10": float(np.mean([bm25[q] for q in qrels])) if bm25 else None,
        "candidates": cands,
        "scoring_seconds_this_run": {k: round(v, 1) for k, v in seconds.items()},
        "summary": summary(per_q, args.chunks),
        "per_query": {m: {o: {str(k): v.round(6).tolist() for k, v in by_k.items()} for o, by_k in by_o.items()}
                      for m, by_o in per_q.items()},
        "qids": list(qrels),
    }
    res["table"] = table(res, args.chunks)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(res, indent=1))
    tmp.replace(out_path)
    print(f"{len(qrels)} queries under every setting; BM25 {res['bm25_ndcg@10']:.3f}", flush=True)
    print(res["table"], flush=True)


if __name__ == "__main__":
    main()
