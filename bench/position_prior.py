"""A learned position prior, subtracted (issue #35 item 5: "or a position-robust scoring"). Probe, stored passes.

    python bench/position_prior.py --model smollm2-135m

Attention heads prefer some prompt positions whatever the content. On shuffled lists a document's position is
independent of its relevance, so the mean of a method's within-query z-scored scores at each prompt position, over
the scifact *train* queries, is that method's position prior. Serving subtracts it: ``z(score) - prior[position]``.
Does this make the routers (whose heads prefer early positions, where the reversed order puts BM25's worst
candidates) as good served reversed as shuffled, and does it hurt the static selections, which gain in the
reversed order by reading BM25's order off the positions?

Every method is the shipped one (fitted on scifact train only), the prior is fitted on scifact train, and each
figure is on another collection's stored test passes, in every stored order: nDCG@10 raw and debiased, paired p.
Writes results/position-prior-<model>.json.
"""

from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from routehead.errors import RouteheadError  # noqa: E402
from routehead.evaluation.runs import save_json, sc_identity  # noqa: E402
from routehead.evaluation.scores import method_scores  # noqa: E402
from routehead.metrics import ndcg_at_k, paired_p_value  # noqa: E402
from routehead.offline.job import ScoreJob  # noqa: E402
from routehead.offline.views import gains  # noqa: E402
from routehead.selection import load_method  # noqa: E402

METHODS = ("icr", "static", "core", "layers", "single", "route", "route-fs", "route-bce")
TESTS = ("trec-dl19-passage", "cranfield", "cisi", "med", "adi")


def zscore(x: np.ndarray) -> np.ndarray:
    return (x - x.mean()) / (x.std() + 1e-9)


def prior_of(scores: dict[str, np.ndarray], positions: dict[str, np.ndarray], n: int) -> np.ndarray:
    """Mean within-query z-score at each prompt position (queries with exactly ``n`` candidates)."""
    acc, cnt = np.zeros(n), np.zeros(n)
    for q, s in scores.items():
        if len(s) != n:
            continue
        np.add.at(acc, positions[q], zscore(s))
        np.add.at(cnt, positions[q], 1)
    return acc / np.maximum(cnt, 1)


def build(name: str, ident: dict) -> object:
    if name.startswith("route-"):
        return load_method("route", ident, router=name.split("-", 1)[1])
    return load_method(name, ident)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--methods", nargs="+", default=list(METHODS))
    ap.add_argument("--collections", nargs="+", default=list(TESTS))
    ap.add_argument("--orders", nargs="+", default=["reverse", "input", "shuffle"])
    args = ap.parse_args()

    def store(coll: str, split: str, order: str, scorer: object) -> tuple:
        return ScoreJob(data=f"../shared/data/{coll}", split=split, model=args.model, dtype="float32",
                        progress=False).with_options(doc_order=order).run(compute=False, scorer=scorer)

    train, scorer = store("scifact", "train", "shuffle", None)
    ident = sc_identity(train, scorer)
    methods = {}
    for m in args.methods:
        try:
            methods[m] = build(m, ident)
        except RouteheadError as exc:  # an asset this model lacks is skipped, and named
            print(f"skip {m}: {exc}")
    n = int(train.settings["top_k"])  # candidates per query: the prior has one value per prompt position
    qids = sorted(train.entries)
    pos = {q: train.entries[q].tokens.positions for q in qids}
    priors = {m: prior_of(method_scores(train, meth, scorer, qids), pos, n) for m, meth in methods.items()}
    for m, p in priors.items():
        print(f"prior {m:12s} " + " ".join(f"{v:+.2f}" for v in p), flush=True)
    out: dict = {"model": args.model, "date": datetime.date.today().isoformat(), "train_queries": len(qids),
                 "priors": {m: p.round(4).tolist() for m, p in priors.items()}, "rows": {}}
    pooled: dict = {}
    for coll in args.collections:
        for order in args.orders:
            sc, scorer = store(coll, "test", order, scorer)
            if not sc.entries:
                continue
            tq = sorted(sc.entries)
            row = {"queries": len(tq)}
            for m, meth in methods.items():
                sco = method_scores(sc, meth, scorer, tq)
                raw, deb = [], []
                for q in tq:
                    g = gains(sc, q, sc.entries[q].doc_ids)
                    s = sco[q]
                    p = sc.entries[q].tokens.positions
                    raw.append(float(ndcg_at_k(s, *g, 10)))
                    adj = zscore(s) - (priors[m][p] if len(s) == n else 0.0)
                    deb.append(float(ndcg_at_k(adj, *g, 10)))
                raw, deb = np.array(raw), np.array(deb)
                pooled.setdefault((order, m), [[], []])
                pooled[(order, m)][0].extend(raw)
                pooled[(order, m)][1].extend(deb)
                row[m] = {"raw": round(float(raw.mean()), 4), "debiased": round(float(deb.mean()), 4),
                          "p": round(float(paired_p_value(deb, raw)), 4)}
            out["rows"][f"{coll}/{order}"] = row
            print(coll, order, {m: (v["raw"], v["debiased"], v["p"]) for m, v in row.items() if m != "queries"},
                  flush=True)
    out["pooled"] = {}
    for (order, m), (raw, deb) in pooled.items():
        raw, deb = np.array(raw), np.array(deb)
        out["pooled"][f"{order}/{m}"] = {"queries": len(raw), "raw": round(float(raw.mean()), 4),
                                        "debiased": round(float(deb.mean()), 4),
                                        "p": round(float(paired_p_value(deb, raw)), 4)}
    for k, v in out["pooled"].items():
        print("pooled", k, v)
    save_json(out, Path(f"results/position-prior-{args.model}.json"))


if __name__ == "__main__":
    main()
