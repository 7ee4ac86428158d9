"""Which CPU compute paths pay (issue #33): matmul GFLOP/s by dtype, int8 dynamic quantization's effect on
rankings, and torch.compile on the plain pass. Writes results/cpu-paths-<model>.json.

    python bench/cpu_paths.py --threads 2                 # default model, 8 scifact train queries
    python bench/cpu_paths.py --skip-compile --queries 4

1. matmul: a ``[3500, 576] x [576, 1536]`` product (a SmolLM2 MLP projection at a 20-document prompt) in float32,
   bfloat16 and int8 (``torch.ao.quantization.quantize_dynamic`` on one ``nn.Linear``), median of 10.
2. int8 rankings: ICR (all heads) scores of BM25's top 20 for the first ``--queries`` scifact *train* queries,
   float32 against the same model with every linear layer quantized dynamically to int8 (weights per tensor,
   activations per tensor per call): Spearman's rho, top-1 and top-10 agreement per query, and the pass time.
3. torch.compile (inductor, dynamic shapes) of the decoder, the plain pass timed after compilation, against eager.
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr

from routehead.api import Reranker
from routehead.evaluation.runs import save_json
from routehead.offline.bm25 import first_stage
from routehead.offline.data import load_collection
from routehead.testing.measure import machine_info


def timed(fn, n: int) -> float:
    fn()
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def matmul_rates() -> dict[str, float]:
    x, w = torch.randn(3500, 576), torch.randn(1536, 576)
    flops = 2 * 3500 * 576 * 1536
    lin = torch.nn.Linear(576, 1536, bias=False)
    lin.weight.data = w
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        q = torch.ao.quantization.quantize_dynamic(torch.nn.Sequential(lin), {torch.nn.Linear}, dtype=torch.qint8)
    xb, wb = x.bfloat16(), w.bfloat16()
    return {"float32": flops / timed(lambda: x @ w.T, 10) / 1e9, "bfloat16": flops / timed(lambda: xb @ wb.T, 10) / 1e9,
            "int8_dynamic": flops / timed(lambda: q(x), 10) / 1e9}


def by_index(rr: Reranker, query: str, docs: list[str]) -> np.ndarray:
    """The documents' scores in input order."""
    r = rr.rerank(query, docs)
    out = np.empty(len(docs))
    out[r.indices] = r.scores
    return out


def int8_rankings(model: str, data: str, n: int) -> dict:
    coll = load_collection(data, "train")
    fs = first_stage(coll, 20)
    qids = [q for q in coll.queries if q in fs][:n]
    items = [(coll.queries[q], [coll.doc_text(d) for d, _ in fs[q][:20]]) for q in qids]
    rr = Reranker(model=model, method="icr", dtype="float32")
    f32 = [by_index(rr, q, d) for q, d in items]
    t32 = timed(lambda: rr.rerank(*items[0]), 2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.ao.quantization.quantize_dynamic(rr.lm.model, {torch.nn.Linear}, dtype=torch.qint8, inplace=True)
    i8 = [by_index(rr, q, d) for q, d in items]
    t8 = timed(lambda: rr.rerank(*items[0]), 2)
    rows = []
    for a, b in zip(f32, i8):
        rows.append({"rho": float(spearmanr(a, b)[0]), "top1_same": bool(a.argmax() == b.argmax()),
                     "top10_overlap": len(set(np.argsort(-a)[:10]) & set(np.argsort(-b)[:10])),
                     "top10_identical": bool(list(np.argsort(-a)[:10]) == list(np.argsort(-b)[:10]))})
    return {"queries": len(rows), "per_query": rows, "median_rho": statistics.median(r["rho"] for r in rows),
            "top10_identical_share": sum(r["top10_identical"] for r in rows) / len(rows),
            "rerank_s_float32": t32, "rerank_s_int8": t8, "speedup": t32 / t8}


def compiled_pass(model: str, data: str) -> dict:
    coll = load_collection(data, "train")
    fs = first_stage(coll, 20)
    q = next(q for q in coll.queries if q in fs)
    docs = [coll.doc_text(d) for d, _ in fs[q][:20]]
    rr = Reranker(model=model, method="icr", dtype="float32")
    eager = timed(lambda: rr.scorer.bare_forward(coll.queries[q], docs), 2)
    t = time.perf_counter()
    try:
        rr.scorer.base = torch.compile(rr.scorer.base, dynamic=True)
        rr.scorer.bare_forward(coll.queries[q], docs)
    except Exception as exc:  # report, do not hide
        return {"eager_s": eager, "error": f"{type(exc).__name__}: {str(exc)[:300]}"}
    compile_s = time.perf_counter() - t
    comp = timed(lambda: rr.scorer.bare_forward(coll.queries[q], docs), 2)
    return {"eager_s": eager, "compiled_s": comp, "compile_s": compile_s, "speedup": eager / comp}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data", default="../shared/data/scifact")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--queries", type=int, default=8)
    ap.add_argument("--skip-compile", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    res = {"machine": machine_info("cpu"), "config": vars(args), "date": datetime.date.today().isoformat()}
    res["matmul_gflops"] = matmul_rates()
    print("matmul", res["matmul_gflops"], flush=True)
    res["int8"] = int8_rankings(args.model, args.data, args.queries)
    print("int8", {k: v for k, v in res["int8"].items() if k != "per_query"}, flush=True)
    if not args.skip_compile:
        res["compile"] = compiled_pass(args.model, args.data)
        print("compile", res["compile"], flush=True)
    save_json(res, Path("results") / f"cpu-paths-{args.model}.json")


if __name__ == "__main__":
    main()
