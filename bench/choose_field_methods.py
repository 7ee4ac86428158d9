"""Choose CoRe's temperature and pruning and Selective-ICR's window width on scifact train, by 2-fold
cross-validation over the stored training passes (issue #34). No test query is read.

    python bench/choose_field_methods.py --model smollm2-135m        # stored train queries, shuffled order

The authors leave these open or set them per model: CoRe's temperature (0.1 for Llama-family models, 0.001 for
Mistral/Granite) and its layer pruning; Selective-ICR's window (Qwen3-0.6B: [10, 13], width 4 of 28 layers).
Each candidate is detected on one half of the stored training queries and scored (nDCG@10 of the live method's
aggregation) on the other half, both ways; the mean of the two held-out halves decides (ties: the authors'
setting, then the cheaper). QRHead-16 and the single best head are scored the same way, for reference.
Writes results/field-methods-choice-<model>.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
from pathlib import Path

import numpy as np

from routehead.engine.aggregate import HeadSet
from routehead.evaluation.runs import save_json
from routehead.metrics import ndcg_at_k
from routehead.offline.job import ScoreJob
from routehead.offline.views import gains, selection_scores
from routehead.selection.base import Selection
from routehead.training.detect import detect_core, detect_heads, window_ndcg

TEMPERATURES = (0.001, 0.01, 0.1, 1.0)
PRUNES = (0.0, 0.25, 0.5)
WIDTHS = (1, 2, 3, 4, 6, 8)


def heldout(sc, heads, qids) -> float:
    sel = Selection(HeadSet.of(heads))
    out = []
    for q in qids:
        g, ideal = gains(sc, q, sc.entries[q].doc_ids)
        out.append(float(ndcg_at_k(selection_scores(sc, q, sel)[None], g, ideal)[0]))
    return float(np.mean(out))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data", default="../shared/data/scifact")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    job = ScoreJob(data=args.data, split="train", model=args.model, dtype="float32",
                   progress=False).with_options(doc_order="shuffle")
    sc, _ = job.run(compute=False)
    qids = sorted(sc.entries)
    rng = np.random.default_rng(args.seed)
    perm = [qids[i] for i in rng.permutation(len(qids))]
    folds = (perm[: len(perm) // 2], perm[len(perm) // 2:])
    L = sc.entries[qids[0]].calibrated.shape[0]
    res: dict = {"model": args.model, "stored_train_queries": len(qids), "num_layers": L,
                 "date": datetime.date.today().isoformat(), "core": {}, "layers": {}, "static": {}}
    for t in TEMPERATURES:
        for p in PRUNES:
            vals = [heldout(sc, detect_core(sc, temperature=t, prune=p, qids=a)[0], b) for a, b in
                    (folds, folds[::-1])]
            res["core"][f"t={t},prune={p}"] = {"temperature": t, "prune": p, "ndcg10": float(np.mean(vals))}
            print("core", t, p, round(float(np.mean(vals)), 4), flush=True)
    for top in (1, 16):
        vals = [heldout(sc, detect_heads(sc, top=top, qids=a)[0], b) for a, b in (folds, folds[::-1])]
        res["static"][f"top{top}"] = float(np.mean(vals))
    widths = [w for w in WIDTHS if w <= L]
    per_query = {q: window_ndcg(sc, q, widths) for q in qids}
    for w in widths:
        table = {q: per_query[q][w] for q in qids}
        vals, depth = [], []
        for a, b in (folds, folds[::-1]):
            start = int(np.argmax(np.mean([table[q] for q in a], axis=0)))  # ties: the shallowest
            vals.append(float(np.mean([table[q][start] for q in b])))
            depth.append(start + w)
        res["layers"][f"width={w}"] = {"width": w, "ndcg10": float(np.mean(vals)), "layers_run": depth}
        print("layers", w, round(float(np.mean(vals)), 4), depth, flush=True)
    core = max(res["core"].values(), key=lambda r: (round(r["ndcg10"], 4), r["temperature"] == 0.1, r["prune"]))
    lay = max(res["layers"].values(), key=lambda r: (round(r["ndcg10"], 4), -r["width"]))
    res["chosen"] = {"core": {"temperature": core["temperature"], "prune": core["prune"]},
                     "layers": {"width": lay["width"]}}
    out = Path("results") / f"field-methods-choice-{args.model}.json"
    save_json(res, out)
    print(json.dumps(res["chosen"]), res["static"])


if __name__ == "__main__":
    main()
