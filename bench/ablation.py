"""Which of the faithful-scoring changes move quality, on scifact train/dev only (never test).

    python bench/ablation.py [--model smollm2-135m] [--doc-order shuffle] [--orders-too]

From the stored token scores of the training store (one forward pass per query, already made), each change is
undone alone and ICR and the static 16 heads (detected on the train part, evaluated on the dev part) are
re-aggregated:
- item 1, mask granularity: each head masked alone, then summed (routehead before) vs summed, then masked;
- item 6, threshold: population std and ``>=`` (before) vs unbiased std and ``>`` (the references);
- item 3, document span: without the ``[i]`` marker tokens (SmolLM2's tokenizer: ``[``, the digits, ``]``).
With ``--orders-too``, item 4 (document order) compares the dev queries' stores under the ``input``,
``reverse`` and ``shuffle`` orders (scored first when missing: one forward pass per query and order;
``bench/choose_default.py`` gives the same comparison for every method on 100 dev queries).
With ``--passes N``, items 2 and 5, which change the forward pass itself, are run on the first N dev queries
(one pass per query and item, same shuffled order, compared with the stored reference passes):
- item 2, query span: only the query's tokens average (late instruction and ``Query:`` moved into the prefix,
  the chat template's closing tokens not run), as routehead did before;
- item 5, text and tokenization: documents as ``title. text`` and the prompt tokenized segment by segment
  (instruction, separator, marker, document), ids concatenated, as routehead did before.
With ``--v1 N``, the shipped ``layout="v1"`` option (items 2 and 5 undone together, :mod:`routehead.engine.prompt`) is
scored on the first N dev queries into its own store (resumable) and compared with the reference store on the same
queries: ICR, and the static 16 heads detected on the reference train part.
Writes results/ablation-<model>.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from scipy.stats import ttest_rel

from routehead.engine.aggregate import HeadSet, SpanIndex, mask_outliers_and_sum, spans_of
from routehead.engine.model import load_model
from routehead.engine.order import prompt_order
from routehead.engine.prompt import Prompt
from routehead.engine.scorer import HeadScorer, normalize_heads, set_weights
from routehead.metrics import ndcg_at_k
from routehead.offline.collect import score_collection
from routehead.offline.data import doc_text, load_collection, split_dev
from routehead.offline.views import gains, head_rows
from routehead.training.detect import detect_heads


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


def evaluate(sc, qids, heads, variant: str, per_query: bool = False) -> float | np.ndarray:
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
        g, ideal = gains(sc, q, e.doc_ids)
        vals.append(float(ndcg_at_k(np.asarray(s, dtype=np.float64), g, ideal)))
    return np.asarray(vals) if per_query else float(np.mean(vals))


def query_only_span(ref: Prompt) -> Prompt:
    """Item 2 undone: the suffix shared by the query and "N/A" prompts (late instruction, ``Query:``) joins the
    prefix, the chat tail is dropped, and only the query's (or "N/A"'s) own tokens are the span."""
    q, na = ref.query_ids, ref.na_ids
    k = 0
    while k < min(len(q), len(na)) and q[k] == na[k]:
        k += 1
    c = 0
    while c < min(len(q), len(na)) - k and q[-1 - c] == na[-1 - c]:
        c += 1
    return Prompt(ref.prefix_ids + q[:k], ref.doc_spans, q[k:len(q) - c], na[k:len(na) - c], ref.truncated)


def segment_prompt(scorer: HeadScorer, ref: Prompt, docs: list[str]) -> Prompt:
    """Item 5 undone: each segment tokenized alone and the ids concatenated (documents as ``title. text``); the
    reference suffix (late instruction .. chat tail) is kept so only text and tokenization change."""
    b = scorer.builder
    prefix, spans = b.segment_body(b.prepare_documents(docs)[0])
    return Prompt(prefix, spans, ref.query_ids, ref.na_ids, ref.truncated)


def set_scores_of(scorer: HeadScorer, prompt: Prompt, heads: list, W: torch.Tensor) -> np.ndarray:
    """``[sets, docs]``: each set (a row of ``W`` over ``heads``) summed over its heads' calibrated rows (query
    minus "N/A"), masked, summed, as the pass aggregates a set."""
    q, na = scorer.query_rows(prompt, heads)
    return mask_outliers_and_sum(W.float() @ (q - na), prompt.doc_spans).numpy()


def pass_items(scorer: HeadScorer, coll, sc, qids, static) -> dict:
    """nDCG@10 of ICR and static-16 with items 2 and 5 undone, one pass per query and item (shuffled order)."""
    L, H = scorer.lm.num_layers, scorer.lm.num_heads
    sel = normalize_heads(None, L, H)
    W = set_weights([HeadSet.of(None), HeadSet.of(static)], sel)
    vals: dict = {"item2-query-only-span": [], "item5-segment-tokenization": []}
    for q in qids:
        ids = sc.entries[q].doc_ids
        perm = prompt_order(len(ids), sc.settings["doc_order"], q)
        new_docs = [coll.prompt_text(ids[j]) for j in perm]
        old_docs = [doc_text(coll.corpus[ids[j]]) for j in perm]
        query = scorer.builder.prepare_query(coll.queries[q])
        texts, _, cut = scorer.builder.prepare_documents(new_docs)
        ref = scorer.builder.build(query, texts, cut)
        g, ideal = gains(sc, q, ids)
        back = np.argsort(perm)  # candidate d sits at prompt position back[d]
        for item, prompt in (("item2-query-only-span", query_only_span(ref)),
                             ("item5-segment-tokenization", segment_prompt(scorer, ref, old_docs))):
            sets = set_scores_of(scorer, prompt, sel, W)[:, back]
            vals[item].append([float(ndcg_at_k(sets[i].astype(np.float64), g, ideal)) for i in range(2)])
        print(q, {k: v[-1] for k, v in vals.items()}, flush=True)
    return {k: {"n": len(v), "icr": float(np.mean([x[0] for x in v])), "static16": float(np.mean([x[1] for x in v]))}
            for k, v in vals.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data", default="../shared/data/scifact")
    ap.add_argument("--doc-order", default="shuffle")
    ap.add_argument("--orders-too", action="store_true")
    ap.add_argument("--passes", type=int, default=0, help="run items 2 and 5 on the first N dev queries")
    ap.add_argument("--v1", type=int, default=0, help="score the v1 layout on the first N dev queries")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
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
    if args.passes:
        sub = dev[: args.passes]
        out["passes"] = {"n": len(sub), "reference": {"icr": evaluate(sc, sub, None, "reference"),
                                                      "static16": evaluate(sc, sub, static, "reference")},
                         **pass_items(scorer, coll, sc, sub, static)}
        print("passes", json.dumps(out["passes"]), flush=True)
    if args.v1:
        sub = dev[: args.v1]
        v1 = HeadScorer(lm, layout="v1")
        so = score_collection(coll, v1, v1.settings(), doc_order=args.doc_order, only=sub, progress=False)
        out["v1_layout"] = {"n": len(sub)}
        for name, heads in (("icr", None), ("static16", static)):
            a, b = (evaluate(st, sub, heads, "reference", per_query=True) for st in (sc, so))
            out["v1_layout"][name] = {"reference": float(a.mean()), "v1": float(b.mean()),
                                      "paired_t_p": float(ttest_rel(b, a).pvalue),
                                      "wins": int((b > a).sum()), "losses": int((b < a).sum())}
        print("v1 layout", json.dumps(out["v1_layout"]), flush=True)
    Path("results").mkdir(exist_ok=True)
    path = Path(f"results/ablation-{lm.name}.json")
    if path.is_file():  # keep the sections of earlier runs that this one did not redo
        out = {**json.loads(path.read_text()), **out}
    path.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
