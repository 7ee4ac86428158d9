"""Training the router on pseudo labels: BCE + a sparsity regulariser, AdamW, early stopping on dev nDCG@10.

Training needs no LLM forward passes: the query embeddings and the stored per-head scores are inputs, so a
router for the default model trains on CPU in seconds. The dev split is carved from the training queries;
the threshold is picked on dev too. Test queries are never seen.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from routehead.heads import ndcg_at_k
from routehead.labels import Query
from routehead.router import Router, RouterConfig

THRESHOLDS = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7)


@dataclass
class TrainSettings:
    epochs: int = 300
    lr: float = 3e-3
    weight_decay: float = 1e-2
    sparsity: float = 0.05  # weight of the mean selection probability in the loss
    eval_every: int = 10
    patience: int = 6  # evaluations without dev improvement before stopping
    seed: int = 0


def routed_ndcg(router: Router, emb: torch.Tensor, queries: list[Query], threshold: float, k: int = 10
                ) -> tuple[float, float]:
    """Mean nDCG@k of the routed selections on ``queries`` and the mean number of signals routed."""
    probs = router.probabilities(emb).numpy()
    vals, sizes = [], []
    for p, q in zip(probs, queries):
        chosen = router.select(p, threshold)
        vals.append(float(ndcg_at_k(q.signals[chosen].sum(0), q.gains, q.ideal, k)))
        sizes.append(len(chosen))
    return float(np.mean(vals)), float(np.mean(sizes))


def best_threshold(router: Router, emb: torch.Tensor, queries: list[Query]) -> tuple[float, float, float]:
    """(threshold, dev nDCG, mean routed) maximising dev nDCG; ties go to the higher (sparser) threshold."""
    scored = [(routed_ndcg(router, emb, queries, t), t) for t in THRESHOLDS]
    (ndcg, size), t = max(scored, key=lambda x: (round(x[0][0], 6), x[1]))
    return t, ndcg, size


def train_router(config: RouterConfig, prior: np.ndarray, train_emb: torch.Tensor, train_labels: np.ndarray,
                 dev_emb: torch.Tensor, dev_queries: list[Query], settings: TrainSettings | None = None
                 ) -> tuple[Router, list[dict]]:
    """Fit a router; returns the best-on-dev router (threshold set) and the evaluation history."""
    s = settings or TrainSettings()
    torch.manual_seed(s.seed)
    router = Router(config, prior=prior)
    opt = torch.optim.AdamW(router.parameters(), lr=s.lr, weight_decay=s.weight_decay)
    y = torch.as_tensor(train_labels, dtype=torch.float32)
    bce = torch.nn.BCEWithLogitsLoss()
    history: list[dict] = []
    t0, d0, n0 = best_threshold(router, dev_emb, dev_queries)
    best = (d0, copy.deepcopy(router.state_dict()), t0)
    history.append({"epoch": 0, "dev_ndcg@10": d0, "threshold": t0, "routed": n0})
    waited = 0
    for epoch in range(1, s.epochs + 1):
        router.train()
        logits = router(train_emb)
        loss = bce(logits, y) + s.sparsity * torch.sigmoid(logits).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if epoch % s.eval_every == 0:
            router.eval()
            t, d, n = best_threshold(router, dev_emb, dev_queries)
            history.append({"epoch": epoch, "loss": float(loss.detach()), "dev_ndcg@10": d, "threshold": t,
                            "routed": n})
            if d > best[0] + 1e-6:
                best, waited = (d, copy.deepcopy(router.state_dict()), t), 0
            else:
                waited += 1
                if waited >= s.patience:
                    break
    router.load_state_dict(best[1])
    router.config.threshold = best[2]
    router.config.training = {**config.training, "dev_ndcg@10": best[0], "epochs_run": history[-1]["epoch"],
                              **{k: getattr(s, k) for k in ("lr", "weight_decay", "sparsity", "seed")}}
    return router.eval(), history


def fit_router(sc: Any, scorer: Any, embed_layer: int, pooling: str = "mean", norm: str = "z",
               use_first_stage: bool = False, max_heads: int = 4, route_max: int = 8, dim: int = 64,
               dev_fraction: float = 0.2, labels_kind: str = "greedy", settings: TrainSettings | None = None
               ) -> tuple[Router, dict[str, Any]]:
    """The whole recipe on a scored training split: carve dev, prior, pseudo labels, embeddings, training.

    ``labels_kind="greedy"``: binary targets, the greedy head set of each query (the paper's pseudo labels).
    ``labels_kind="soft"``: each signal's own nDCG@10 on the query as the target, so every query teaches the
    router about every head, not only about the one or two the greedy search kept.
    """
    from routehead.data import split_dev
    from routehead.evaluate import queries_for, query_embeddings
    from routehead.labels import label_queries, quality

    tr_ids, dev_ids = split_dev(sorted(sc.entries), dev_fraction=dev_fraction, seed=0)
    train_q = queries_for(sc, norm, use_first_stage, tr_ids)
    dev_q = queries_for(sc, norm, use_first_stage, dev_ids)
    prior = quality(train_q)
    labels = label_queries(train_q, prior, max_heads=max_heads)
    n = len(prior)
    freq = np.zeros(n)
    for chosen, _ in labels.values():
        freq[chosen] += 1
    freq = (freq + 0.1) / (len(labels) + 1.0)
    emb = query_embeddings(sc, scorer, embed_layer, pooling)
    lab_ids = sorted(labels)
    y = np.zeros((len(lab_ids), n))
    if labels_kind == "soft":
        by_id = {q.qid: q for q in train_q}
        for i, qid in enumerate(lab_ids):
            q = by_id[qid]
            y[i] = ndcg_at_k(q.signals, q.gains, q.ideal)
        freq = np.clip(prior, 1e-3, 1 - 1e-3)
    elif labels_kind == "greedy":
        for i, qid in enumerate(lab_ids):
            y[i, labels[qid][0]] = 1.0
    else:
        raise ValueError(f"unknown labels_kind {labels_kind!r}; use 'greedy' or 'soft'")
    config = RouterConfig(identity=scorer.lm.identity(), embed_layer=embed_layer, pooling=pooling, dim=dim,
                          max_heads=route_max, norm=norm, use_first_stage=use_first_stage,
                          max_doc_tokens=scorer.builder.max_doc_tokens,
                          training={"collection": sc.collection.name, "split": sc.collection.split,
                                    "train_queries": len(tr_ids), "labelled": len(lab_ids), "dev_queries": len(dev_ids),
                                    "label_max_heads": max_heads, "labels": labels_kind,
                                    "mean_label_size": float(np.mean([len(v[0]) for v in labels.values()]))})
    router, history = train_router(config, freq, torch.cat([emb[q] for q in lab_ids]), y,
                                   torch.cat([emb[q] for q in dev_ids]), dev_q, settings)
    return router, {"history": history, "labels": {q: labels[q] for q in lab_ids}, "dev_ids": dev_ids,
                    "prior": prior.tolist()}
