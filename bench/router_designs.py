"""Can a router route at this model size? Router designs against the strongest static selections, out of sample
(issue #35, item 3).

    python bench/router_designs.py --model smollm2-135m --train ../shared/data/scifact:train \
        --test ../shared/data/adi:test

Reads stored passes (shuffled lists) and the router's query embeddings (FIT's layer and pooling, cached next to
the store); no forward pass. Every design is fitted on training queries only and scored on queries it did not
see: 5-fold out-of-fold on the training collection, and fitted on all of it then scored on each ``--test``
collection (a collection never trained on). Designs:

- ``fixed:<m>``: each published selection alone (static = QRHead-16, core = CoRe-8, layers = the Selective-ICR
  window, single, icr), their shipped assets; ``best fixed`` is the one with the best training mean, chosen
  inside each fold (the strongest static selection, the baseline every router must beat).
- ``expert gate``: a router choosing one of those selections per query (a mixture of head-set experts): ridge
  regression from the PCA-reduced, standardised query embedding to each expert's nDCG@10 advantage over the
  fold's best fixed one; the query takes the expert with the largest predicted advantage when it is positive,
  else the best fixed one. ``--dims`` and ``--alphas`` are chosen inside each fold by an inner 4-fold split.
- ``linear``: a learned signed linear combination of the ``--pool`` best heads (detected on the fold), aggregated
  as inference aggregates (weighted token sum, outlier mask, sum), trained with ListNet on the fold's queries
  with an L2 pull towards the static set, its temperature and step chosen on a fifth of them
  (:func:`routehead.training.linear.fit_linear_on`; the "learned linear combination of all heads" baseline).

Writes results/router-designs-<model>.json: per design, mean nDCG@10 and the paired p-value against best fixed.
"""

from __future__ import annotations

import argparse
import datetime
import json
from pathlib import Path

import numpy as np
import torch

from routehead.evaluation.runs import save_json, sc_identity
from routehead.metrics import ndcg_at_k, paired_p_value
from routehead.offline.job import ScoreJob
from routehead.offline.views import gains, query_embeddings, selection_scores
from routehead.selection import load_method
from routehead.settings import FIT
from routehead.training.linear import fit_linear_on

MENU = ("static", "core", "layers", "single", "icr")


def load(spec: str, model: str):
    data, split = spec.rsplit(":", 1)
    sc, scorer = ScoreJob(data=data, split=split, model=model, dtype="float32",
                          progress=False).with_options(doc_order="shuffle").run(compute=False)
    qids = sorted(sc.entries)
    ident = sc_identity(sc, scorer)
    sels = [load_method(m, ident).select() for m in MENU]
    Y = np.zeros((len(qids), len(MENU)))
    for i, q in enumerate(qids):
        g, ideal = gains(sc, q, sc.entries[q].doc_ids)
        Y[i] = [ndcg_at_k(selection_scores(sc, q, s)[None], g, ideal, 10)[0] for s in sels]
    emb = query_embeddings(sc, scorer, FIT.embed_layer, FIT.pooling, qids)
    X = torch.cat([emb[q] for q in qids]).double().numpy()
    return sc, qids, X, Y


def folds(n: int, k: int, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    perm = np.random.default_rng(seed).permutation(n)
    return [(np.setdiff1d(perm, perm[i::k]), np.sort(perm[i::k])) for i in range(k)]


def gate_fit(X: np.ndarray, Y: np.ndarray, dim: int, alpha: float):
    """Ridge from the top-``dim`` principal components of the standardised embedding to each expert's advantage
    over the best fixed expert; returns (predict(X) -> chosen expert, best fixed index)."""
    mu, sd = X.mean(0), X.std(0) + 1e-6
    Z = (X - mu) / sd
    _, _, Vt = np.linalg.svd(Z, full_matrices=False)
    V = Vt[:dim].T
    F = np.hstack([Z @ V, np.ones((len(Z), 1))])
    fixed = int(Y.mean(0).argmax())
    T = Y - Y[:, [fixed]]
    W = np.linalg.solve(F.T @ F + alpha * np.diag([1.0] * dim + [0.0]), F.T @ T)

    def choose(Xn: np.ndarray) -> np.ndarray:
        p = np.hstack([((Xn - mu) / sd) @ V, np.ones((len(Xn), 1))]) @ W
        return np.where(p.max(1) > 0, p.argmax(1), fixed)

    return choose, fixed


def gate(X: np.ndarray, Y: np.ndarray, dims: list[int], alphas: list[float]):
    """The gate with (dim, alpha) chosen by an inner 4-fold split of the training queries."""
    best, arg = -1.0, (dims[0], alphas[0])
    for d in dims:
        for a in alphas:
            vals = []
            for tr, te in folds(len(X), 4, seed=1):
                choose, _ = gate_fit(X[tr], Y[tr], min(d, len(tr) - 1), a)
                vals.append(Y[te, choose(X[te])])
            v = float(np.concatenate(vals).mean())
            if v > best + 1e-12:
                best, arg = v, (d, a)
    return gate_fit(X, Y, *arg)[0], arg


def linear_score(sc, qids: list[str], sel) -> np.ndarray:
    """nDCG@10 of the fitted linear combination (one selection for every query) on ``qids``."""
    out = []
    for q in qids:
        g, ideal = gains(sc, q, sc.entries[q].doc_ids)
        out.append(float(ndcg_at_k(selection_scores(sc, q, sel)[None], g, ideal, 10)[0]))
    return np.array(out)


def separability(X: np.ndarray, Xt: np.ndarray) -> dict[str, float]:
    """How different two collections' query embeddings are (can a router see the domain?): mean cosine within
    each and between them (standardised on both), and the balanced accuracy of a nearest-centroid domain
    classifier, 5-fold."""
    Z = np.vstack([X, Xt])
    Z = (Z - Z.mean(0)) / (Z.std(0) + 1e-6)
    y = np.r_[np.zeros(len(X)), np.ones(len(Xt))]
    U = Z / np.linalg.norm(Z, axis=1, keepdims=True)
    A, B = U[y == 0], U[y == 1]
    hits = np.zeros(len(Z))
    for tr, te in folds(len(Z), 5):
        c0, c1 = Z[tr][y[tr] == 0].mean(0), Z[tr][y[tr] == 1].mean(0)
        pred = (((Z[te] - c1) ** 2).sum(1) < ((Z[te] - c0) ** 2).sum(1)).astype(float)
        hits[te] = pred == y[te]
    return {"cos_within_train": round(float((A @ A.T).mean()), 3), "cos_within_test": round(float((B @ B.T).mean()), 3),
            "cos_between": round(float((A @ B.T).mean()), 3),
            "domain_balanced_accuracy": round(float((hits[y == 0].mean() + hits[y == 1].mean()) / 2), 3)}


def summary(vals: dict[str, np.ndarray]) -> dict[str, dict[str, float]]:
    base = vals["best fixed"]
    return {k: {"ndcg@10": round(float(v.mean()), 4), "vs_best_fixed": round(float((v - base).mean()), 4),
                "p": round(float(paired_p_value(v, base)), 4) if k != "best fixed" else 1.0}
            for k, v in vals.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--train", default="../shared/data/scifact:train")
    ap.add_argument("--test", nargs="*", default=[])
    ap.add_argument("--dims", type=int, nargs="*", default=[4, 16, 64])
    ap.add_argument("--alphas", type=float, nargs="*", default=[10.0, 1000.0])
    ap.add_argument("--pool", type=int, default=64)
    ap.add_argument("--l2", type=float, default=0.01)
    ap.add_argument("--no-linear", action="store_true")
    args = ap.parse_args()
    sc, qids, X, Y = load(args.train, args.model)
    static = [tuple(h) for h in load_method("static", sc_identity(sc)).select().heads.heads]
    oof = {f"fixed:{m}": Y[:, i] for i, m in enumerate(MENU)}
    oof["best fixed"], oof["expert gate"] = np.zeros(len(qids)), np.zeros(len(qids))
    if not args.no_linear:
        oof["linear"] = np.zeros(len(qids))
    picks = []
    for tr, te in folds(len(qids), 5):
        choose, arg = gate(X[tr], Y[tr], args.dims, args.alphas)
        fixed = int(Y[tr].mean(0).argmax())
        ch = choose(X[te])
        picks.append({"fixed": MENU[fixed], "gate": list(arg), "chosen": np.bincount(ch, minlength=len(MENU)).tolist()})
        oof["best fixed"][te], oof["expert gate"][te] = Y[te, fixed], Y[te, ch]
        if not args.no_linear:
            sel = fit_linear_on(sc, args.pool, static, qids=[qids[i] for i in tr], l2=args.l2)
            oof["linear"][te] = linear_score(sc, [qids[i] for i in te], sel)
        print("fold", picks[-1], flush=True)
    res = {"model": args.model, "train": args.train, "queries": len(qids), "date": datetime.date.today().isoformat(),
           "order": "shuffle", "menu": list(MENU), "out_of_fold": summary(oof), "folds": picks, "tests": {}}
    print(json.dumps(res["out_of_fold"], indent=1), flush=True)
    choose, arg = gate(X, Y, args.dims, args.alphas)
    fixed = int(Y.mean(0).argmax())
    lin = None if args.no_linear else fit_linear_on(sc, args.pool, static, qids=qids, l2=args.l2)
    for spec in args.test:
        tsc, tq, tX, tY = load(spec, args.model)
        ch = choose(tX)
        vals = {f"fixed:{m}": tY[:, i] for i, m in enumerate(MENU)}
        vals["best fixed"], vals["expert gate"] = tY[:, fixed], tY[np.arange(len(tq)), ch]
        if lin is not None:
            vals["linear"] = linear_score(tsc, tq, lin)
        res["tests"][spec] = {"queries": len(tq), "best_fixed": MENU[fixed], "gate": list(arg),
                              "embeddings": separability(X, tX),
                              "chosen": np.bincount(ch, minlength=len(MENU)).tolist(), **summary(vals)}
        print(spec, json.dumps(res["tests"][spec], indent=1), flush=True)
    save_json(res, Path("results") / f"router-designs-{args.model}.json")


if __name__ == "__main__":
    main()
