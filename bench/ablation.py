"""Which of the faithful-scoring changes move quality, on scifact train/dev only (never test).

    python bench/ablation.py [--model smollm2-135m] [--doc-order shuffle] [--orders-too]

From the stored token scores of the training store (one forward pass per query, already made), each change is
undone alone and ICR and the static 16 heads (detected on the train part, evaluated on the dev part) are
re-aggregated:
- item 1, mask granularity: each head masked alone, then summed (routehead before) vs summed, then masked;
- item 6, threshold: population std and ``>=`` (before) vs unbiased std and ``>`` (the references);
- item 3, document span: without the ``[i]`` marker tokens (SmolLM2's tokenizer: ``[``, the digits, ``]``).
With ``--orders-too``, item 4 (document order) compares the dev queries' stores under the ``input``,
``reverse`` and ``shuffle`` orders (scored first when missing: one forward pass per query and order).
Items 2 (query span) and 5 (text and tokenization) change the forward pass itself and are not separable from
the stored passes; they are not in this table. Writes results/ablation-<model>.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from routehead.collect import score_collection
from routehead.data import load_collection, split_dev
from routehead.evaluate import _gains, detect_heads, head_rows
from routehead.heads import ndcg_at_k, spans_of
from routehead.model import load_model
from routehead.scorer import HeadScorer, SpanIndex


def masked_sum(x: torch.Tensor, si: SpanIndex, unbiased: bool = True, strict: bool = True) -> np.ndarray:
    v = si.valid.double()
    t = x.double()[:, si.idx]
    cnt = v.sum(-1)
    mean = (t * v).sum(-1) / cnt.clamp(min=1)
    var = (((t - mean[..., None]) * v) ** 2).sum(-1) / ((cnt - 1) if unbiased else cnt.clamp(min=1))
    thr = (mean - 2 * var.sqrt())[..., None]
    keep = si.valid & ((t > thr) if strict else (t >= thr))
    return (t * keep).sum(-1).numpy()


def without_marker(counts: np.ndarray, positions: np.ndarray) -> SpanIndex:
    bounds = np.concatenate([[0], np.cumsum(counts)])
    m = [2 + len(str(int(p) + 1)) for p in positions]
    return SpanIndex.build([(int(a) + min(k, int(b - a) - 1), int(b)) for a, b, k in zip(bounds[:-1], bounds[1:], m)])


def evaluate(sc, qids, heads, variant: str) -> float:
    vals = []
    for q in qids:
        e = sc.entries[q]
        t = e.tokens
        si = spans_of(t.counts)
        rows = torch.from_numpy(t.total)[None] if heads is None else head_rows(sc, q, heads).sum(0, keepdim=True)
        if variant == "reference":
            s = masked_sum(rows, si)[0]
        elif variant == "item1-per-head-mask":
            s = (e.calibrated.reshape(-1, e.calibrated.shape[-1]).sum(0) if heads is None
                 else np.sum([e.calibrated[a, b] for a, b in heads], axis=0))
        elif variant == "item6-population-std-ge":
            s = masked_sum(rows, si, unbiased=False, strict=False)[0]
        elif variant == "item3-no-marker":
            s = masked_sum(rows, without_marker(t.counts, t.positions))[0]
        else:
            raise ValueError(variant)
        gains, ideal = _gains(sc, q, e.doc_ids)
        vals.append(float(ndcg_at_k(np.asarray(s, dtype=np.float64), gains, ideal)))
    return float(np.mean(vals))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data", default="../shared/data/scifact")
    ap.add_argument("--doc-order", default="shuffle")
    ap.add_argument("--orders-too", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    lm = load_model(args.model)
    scorer = HeadScorer(lm)
    coll = load_collection(args.data, "train")
    sc = score_collection(coll, None, scorer.settings(), doc_order=args.doc_order)
    ids = sorted(sc.entries)
    tr, dev = split_dev(ids, 0.2, seed=0)
    static, _ = detect_heads(sc, 16, tr)
    out = {"model": lm.name, "store_order": args.doc_order, "train": len(tr), "dev": len(dev),
           "date": time.strftime("%Y-%m-%d"), "static16": [list(h) for h in static], "dev_ndcg@10": {}}
    for variant in ("reference", "item1-per-head-mask", "item6-population-std-ge", "item3-no-marker"):
        out["dev_ndcg@10"][variant] = {"icr": evaluate(sc, dev, None, variant),
                                       "static16": evaluate(sc, dev, static, variant)}
        print(variant, json.dumps(out["dev_ndcg@10"][variant]), flush=True)
    if args.orders_too:
        out["item4-order"] = {}
        for order in ("input", "reverse", "shuffle"):
            so = sc if order == args.doc_order else score_collection(coll, scorer, scorer.settings(), doc_order=order,
                                                                     only=dev, progress=False)
            keep = [q for q in dev if q in so.entries]
            out["item4-order"][order] = {"n": len(keep), "icr": evaluate(so, keep, None, "reference"),
                                         "static16": evaluate(so, keep, static, "reference")}
            print(order, json.dumps(out["item4-order"][order]), flush=True)
    Path("results").mkdir(exist_ok=True)
    Path(f"results/ablation-{lm.name}.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
