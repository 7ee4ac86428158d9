"""Training the router: the paper's BCE on pseudo labels, or a listwise loss through the ranking itself.

Training needs no LLM forward passes: the query embeddings and the stored per-head scores are inputs, so a
router for the default model trains on CPU in seconds. The dev split is carved from the training queries;
early stopping and the threshold are chosen on dev nDCG@10 of the routed selection (less the price of the layers
its passes run, when there is one). Test queries are never seen.

Objectives (both with a sparsity term, ``sparsity * mean routing probability`` over the routable pool, and a
depth term, ``depth_cost * expected fraction of layers a routed pass runs``):
- ``bce`` (the paper): binary cross-entropy against the greedy pseudo labels; the selected heads are summed.
- ``listwise``: the document scores are those of the probability-weighted head set, aggregated as inference
  aggregates (weighted token sum, outlier mask, sum; standardised per query, plus the weighted first stage),
  and the loss is the cross-entropy between their softmax and the query's normalised relevance grades
  (ListNet). It trains the router on what inference does, with every head of every query giving
  gradient, instead of on binary labels that a greedy search picked among many near-equal sets. It starts
  from a static selection (logit +2, the rest -4): the single best head on the training queries, or with
  ``start="set"`` the greedy set best on them together; so the router is residual: it learns when and where a
  query should leave the strong static default. Optional ``bce_weight`` adds the
  pseudo-label BCE as an auxiliary term.

The depth term makes the router cost-aware: a routed pass stops after its deepest routed layer, so its cost is
that layer's depth, a per-query quantity. Unlike a depth budget (``max_layer``: no head deeper than L for any
query), it lets a query keep a deep head when the ranking gains enough from it, and pushes the rest shallower.
"""

from __future__ import annotations

import copy
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, replace
from typing import Any

import numpy as np
import torch

from routehead.errors import RouteheadError
from routehead.metrics import ndcg_at_k
from routehead.offline.collect import namespace
from routehead.offline.views import Query, doc_scores, queries_for, query_embeddings
from routehead.selection.router import Router, RouterConfig, merge_routers
from routehead.settings import FitSettings
from routehead.training.detect import detect_heads
from routehead.training.labels import greedy_set, label_queries, prior_quality
from routehead.training.objectives import Batch, expected_layers_run, listwise_loss, padded

THRESHOLDS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7)
OBJECTIVES = ("bce", "listwise")


def layers_run(heads: list[tuple[int, int]], num_layers: int) -> float:
    """Fraction of the model's layers a routed pass over ``heads`` runs (it stops after the deepest)."""
    return (max(a for a, _ in heads) + 1) / num_layers if heads else 0.0


def routed_values(router: Router, probs: torch.Tensor, queries: list[Query], threshold: float, k: int = 10
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per query: nDCG@k of the routed selection (from routing probabilities ``[Q, signals]``), the number of
    signals routed, and the fraction of layers the routed pass runs. Per query, so that two routers can be
    compared with a paired test over the same queries."""
    vals, sizes, depth = [], [], []
    for p, q in zip(probs, queries):
        r = router.route_probs(p, threshold)
        vals.append(float(ndcg_at_k(doc_scores(q, r.signals, r.signal_weights), q.gains, q.ideal, k)))
        sizes.append(len(r.signals))
        depth.append(layers_run(r.heads, router.config.num_layers))
    return np.array(vals), np.array(sizes, dtype=float), np.array(depth)


def routed_ndcg(router: Router, probs: torch.Tensor, queries: list[Query], threshold: float, k: int = 10
                ) -> tuple[float, float, float]:
    """Mean nDCG@k of the routed selections (weighted by each query's ``weight``), the mean number of signals
    routed, and the mean fraction of layers the routed passes run (:func:`routed_values`, averaged)."""
    vals, sizes, depth = routed_values(router, probs, queries, threshold, k)
    w = [q.weight for q in queries]
    return float(np.average(vals, weights=w)), float(sizes.mean()), float(depth.mean())


def best_threshold(router: Router, probs: torch.Tensor, queries: list[Query], depth_cost: float = 0.0,
                   cost: Callable[[float], float] | None = None) -> tuple[float, float, float, float]:
    """(threshold, nDCG, mean routed, fraction of layers run) maximising ``nDCG - depth_cost * layers run``;
    ties go to the higher (sparser) threshold. ``cost(t)``: the fraction of layers run at threshold ``t`` when
    it is not these routings' own (a merged router's, whose quality is only known from its members')."""
    rows = []
    for t in THRESHOLDS:
        ndcg, size, depth = routed_ndcg(router, probs, queries, t)
        depth = depth if cost is None else cost(t)
        rows.append((round(ndcg - depth_cost * depth, 6), t, ndcg, size, depth))
    _, t, ndcg, size, depth = max(rows, key=lambda r: (r[0], r[1]))
    return t, ndcg, size, depth


def train_router(config: RouterConfig, init_bias: np.ndarray, train_emb: torch.Tensor, train_queries: list[Query],
                 train_labels: np.ndarray | None, dev_emb: torch.Tensor, dev_queries: list[Query],
                 settings: FitSettings | None = None) -> tuple[Router, list[dict]]:
    """Fit a router; returns the best-on-dev router (threshold set) and the evaluation history.

    ``init_bias`` is each signal's starting selection probability; ``train_labels`` ``[Q, n]`` are the pseudo
    labels (needed for ``bce``, optional auxiliary for ``listwise``). Queries without a relevant candidate
    teach the listwise loss nothing and are left out of it.
    """
    s = settings or FitSettings()
    if s.objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {s.objective!r}; use one of {OBJECTIVES}")
    if s.depth_cost < 0 or s.sparsity < 0:
        raise RouteheadError(f"depth_cost and sparsity are prices and cannot be negative "
                             f"(got {s.depth_cost}, {s.sparsity})")
    torch.manual_seed(s.seed)
    router = Router(config, prior=init_bias)
    opt = torch.optim.AdamW(router.parameters(), lr=s.lr, weight_decay=s.weight_decay)
    batch = padded(train_queries)
    useful = batch.G.sum(1) > 0
    qw = torch.tensor([q.weight for q in train_queries], dtype=torch.float32)
    if s.objective == "listwise":
        batch = Batch(*(t[useful] for t in (batch.X, batch.idx, batch.valid, batch.G, batch.M, batch.F, batch.A)))
    y = torch.as_tensor(train_labels, dtype=torch.float32) if train_labels is not None else None
    labelled = y.sum(1) > 0 if y is not None else None  # uninformative queries have no label
    bce_weight = 1.0 if s.objective == "bce" else s.bce_weight
    if bce_weight > 0 and y is None:
        raise ValueError("the bce objective needs pseudo labels")
    history: list[dict] = []
    head_layers = torch.as_tensor([a for a, _ in config.pool_heads])
    t0, d0, n0, l0 = best_threshold(router, router.probabilities(dev_emb), dev_queries, s.depth_cost)
    best = (d0 - s.depth_cost * l0, copy.deepcopy(router.state_dict()), t0, d0, l0)
    history.append({"epoch": 0, "dev_ndcg@10": d0, "threshold": t0, "routed": n0, "layers_run": l0})
    waited = 0
    for epoch in range(1, s.epochs + 1):
        router.train()
        logits = router(train_emb)
        P = torch.sigmoid(logits)
        loss = s.sparsity * P.mean()
        if s.depth_cost > 0:
            loss = loss + s.depth_cost * expected_layers_run(logits[:, :len(head_layers)], head_layers,
                                                             config.num_layers).mean()
        if s.objective == "listwise":
            loss = loss + listwise_loss(P[useful], batch, s.temperature, config.use_first_stage,
                                        qw[useful] if s.balance else None)
        if bce_weight > 0:
            bce = torch.nn.functional.binary_cross_entropy_with_logits(logits[labelled], y[labelled],
                                                                       reduction="none" if s.balance else "mean")
            if s.balance:
                bce = (qw[labelled] * bce.mean(1)).sum() / qw[labelled].sum()
            loss = loss + bce_weight * bce
        opt.zero_grad()
        loss.backward()
        opt.step()
        if epoch % s.eval_every == 0:
            router.eval()
            t, d, n, depth = best_threshold(router, router.probabilities(dev_emb), dev_queries, s.depth_cost)
            history.append({"epoch": epoch, "loss": float(loss.detach()), "dev_ndcg@10": d, "threshold": t,
                            "routed": n, "layers_run": depth})
            if d - s.depth_cost * depth > best[0] + 1e-6:
                best, waited = (d - s.depth_cost * depth, copy.deepcopy(router.state_dict()), t, d, depth), 0
            else:
                waited += 1
                if waited >= s.patience:
                    break
    router.load_state_dict(best[1])
    router.config.threshold = best[2]
    best_epoch = max(history, key=lambda h: h["dev_ndcg@10"] - s.depth_cost * h["layers_run"])["epoch"]
    router.config.training = {**config.training, "dev_ndcg@10": best[3], "dev_layers_run": best[4],
                              "epochs_run": history[-1]["epoch"],
                              "best_epoch": best_epoch, **asdict(s)}
    return router.eval(), history


def fit_router(sc: Any, scorer: Any, settings: FitSettings | None = None) -> tuple[Router, dict[str, Any]]:
    """The whole recipe on a scored training split: pool, carve dev, prior, pseudo labels, embeddings, training.

    Every choice is a field of ``settings`` (:class:`routehead.settings.FitSettings`). ``sc`` is one stored
    collection split or several merged (:func:`routehead.offline.collect.merge_scored`): pool, folds and dev split
    are then drawn over all their queries together, and the router records them all as seen.
    ``pool_size``: the routable pool is the ``pool_size`` heads best alone (QRHead detection) on the training
    queries, plus the first stage if used; the router, its labels and its training see only the pool.
    ``max_layer``: the pool holds heads of layers ``<= max_layer`` only, so every routed pass can stop after that
    layer (RouteHead's early exit with a guaranteed depth: a speed budget, paid for in quality on deep heads).
    ``labels="greedy"``: binary targets, the greedy head set of each query (the paper's pseudo labels).
    ``labels="soft"``: each signal's own nDCG@10 on the query as the target.
    ``folds > 1``: K-fold cross-fitting instead of one dev split (``info`` then holds per-fold lists, the fold
    routers themselves under ``members``). Each
    fold's router starts from the same selection (chosen on all training queries, like the pool; listwise) and
    is early-stopped on its own held-out fold; the K routers are merged into one (mean logits,
    :func:`routehead.selection.router.merge_routers`) and the threshold is chosen on the out-of-fold
    probabilities, so every training query is used for training and, once, for validation.
    """
    from routehead.offline.data import split_dev

    s = settings or FitSettings()
    folds = s.folds
    ids = sorted(sc.entries)
    if folds > 1:
        order = list(ids)
        np.random.default_rng(0).shuffle(order)
        parts = [(sorted(set(ids) - set(order[k::folds])), sorted(order[k::folds])) for k in range(folds)]
    else:
        parts = [split_dev(ids, dev_fraction=s.dev_fraction, seed=0)]
    # from all training queries: one pool for every fold
    pool, _ = detect_heads(sc, top=s.pool_size, qids=ids, max_layer=s.max_layer)
    all_q = {q.qid: q for q in queries_for(sc, pool, s.use_first_stage, ids)}
    if s.balance:
        balance_collections(sc, list(all_q.values()))
    emb = query_embeddings(sc, scorer, s.embed_layer, s.pooling, ids)
    config = RouterConfig(identity=scorer.lm.identity(), embed_layer=s.embed_layer, pool=[list(h) for h in pool],
                          pooling=s.pooling, dim=s.dim, max_heads=s.route_max, use_first_stage=s.use_first_stage,
                          weighting="prob" if s.objective == "listwise" else "none",
                          prompt=scorer.builder.settings(),
                          training={"collection": sc.collection.name, "split": sc.collection.split,
                                    "doc_order": sc.settings.get("doc_order"), "label_max_heads": s.label_max_heads,
                                    "labels": s.labels, "max_layer": s.max_layer, **trained_members(sc)})
    # cross-fitted: one starting selection for every fold, from all training queries too (like the pool). Folds
    # that started from different sets each keep their own, and merging them (mean logits) keeps only the heads
    # they share: the shipped router would route what no fold was validated on.
    start = (_start_signals(config, list(all_q.values()), s) if s.objective == "listwise" and folds > 1
             else None)
    members, infos, oof = [], [], {}
    for tr_ids, dev_ids in parts:
        router, info = _fit_restarts(config, [all_q[q] for q in tr_ids], [all_q[q] for q in dev_ids], emb, s,
                                     start)
        members.append(router)
        infos.append(info)
        for q in dev_ids:
            oof[q] = router.probabilities(emb[q])[0]
    if folds <= 1:
        return members[0], infos[0]
    merged = merge_routers(members)
    # Quality comes from the members' out-of-fold routings; the cost is the merged router's own on the training
    # queries (no labels needed). Merging averages the members' logits, so a deep head that one member routes
    # can survive the merge: the members' out-of-fold depth understates what the shipped router runs.
    train_probs = merged.probabilities(torch.cat([emb[q] for q in ids]))

    def cost(t: float) -> float:
        return float(np.mean([layers_run(merged.route_probs(p, t).heads, config.num_layers) for p in train_probs]))

    oof_probs, queries = torch.stack([oof[q] for q in ids]), [all_q[q] for q in ids]
    t, nd, size, depth = best_threshold(merged, oof_probs, queries, s.depth_cost, cost)
    merged.config.threshold = t
    merged.config.training = {**members[0].config.training, "folds": folds, "oof_ndcg@10": nd, "routed_oof": size,
                              "layers_run_train": depth,
                              "dev_ndcg@10": nd,
                              "fold_dev_ndcg@10": [m.config.training["dev_ndcg@10"] for m in members],
                              "best_epoch": [m.config.training["best_epoch"] for m in members],
                              "train_queries": len(ids)}
    oof_vals, _, _ = routed_values(merged, oof_probs, queries, t)
    return merged, {"history": [i["history"] for i in infos], "labels": [i["labels"] for i in infos],
                    "dev_ids": [i["dev_ids"] for i in infos], "members": members,  # the fold routers merged
                    "oof_ndcg@10": dict(zip(ids, oof_vals.tolist()))}  # per query, for paired comparisons


def _start_signals(config: RouterConfig, queries: list[Query], s: FitSettings) -> list[int]:
    """The listwise router's starting selection on ``queries``: the single pool signal best alone net of its
    layers' price (``start="single"``), or the greedy set best together (``start="set"``)."""
    prior = prior_quality(queries)
    depth = s.depth_cost * signal_depths(config)
    if s.start == "set":
        return [int(i) for i in greedy_set(queries, prior, s.label_max_heads, cost=depth)[0]]
    if s.start == "single":
        return [best_single(prior, config, s.depth_cost)]
    raise RouteheadError(f"unknown start {s.start!r}; use 'single' or 'set'")


def _fit_restarts(config: RouterConfig, train_q: list[Query], dev_q: list[Query], emb: dict[str, torch.Tensor],
                  s: FitSettings, start: list[int] | None = None) -> tuple[Router, dict[str, Any]]:
    """``s.restarts`` routers on one split, seeds ``s.seed + r``, merged into one (mean logits), the threshold
    re-chosen on dev for the merge. One restart is :func:`_fit_split` itself."""
    if s.restarts <= 1:
        return _fit_split(copy.deepcopy(config), train_q, dev_q, emb, s, start)
    runs = [_fit_split(copy.deepcopy(config), train_q, dev_q, emb, replace(s, seed=s.seed + r), start)
            for r in range(s.restarts)]
    merged = merge_routers([r for r, _ in runs])
    dev_emb = torch.cat([emb[q.qid] for q in dev_q])
    t, d, _, depth = best_threshold(merged, merged.probabilities(dev_emb), dev_q, s.depth_cost)
    merged.config.threshold = t
    first = runs[0][1]
    merged.config.training = {**runs[0][0].config.training, "dev_ndcg@10": d, "dev_layers_run": depth,
                              "restart_dev_ndcg@10": [r.config.training["dev_ndcg@10"] for r, _ in runs],
                              "best_epoch": [r.config.training["best_epoch"] for r, _ in runs]}
    return merged, first


def balance_collections(sc: Any, queries: list[Query]) -> None:
    """Weigh each member collection of a merged view equally: a query's ``weight`` is ``N / (G * n_g)`` for N
    queries in G collections, n_g of them in its own (mean 1). Merging scifact train's 809 queries with a few
    dozen from each other collection would otherwise let scifact alone decide what the router learns."""
    prefixes = [namespace(m) for m in sc.members]
    groups = [next((p for p in prefixes if q.qid.startswith(p)), "") for q in queries]  # "": one store
    counts = Counter(groups)
    for q, g in zip(queries, groups):
        q.weight = len(queries) / (len(counts) * counts[g])


def trained_members(sc: Any) -> dict[str, Any]:
    """A merged view's collection splits (``<collection>/<split>``), for the router's record of what it has seen
    (:attr:`routehead.selection.router.RouterConfig.trained_on`); nothing for one store, whose name says it."""
    members = sc.settings.get("members")
    return {"members": [f"{m['collection']}/{m['split']}" for m in members]} if members else {}


def residual_start(prior: np.ndarray, config: RouterConfig, depth_cost: float = 0.0,
                   chosen: list[int] | None = None) -> np.ndarray:
    """The listwise router's starting probabilities: the signals ``chosen`` (default: the single pool head best
    by the training objective, its mean nDCG@10 alone on the training queries less the price of the layers its
    pass runs) at logit +2, every other signal at -4. Training then learns when a query should leave them."""
    init = np.full(len(prior), 1.0 / (1.0 + np.exp(4.0)))
    init[[best_single(prior, config, depth_cost)] if chosen is None else chosen] = 1.0 / (1.0 + np.exp(-2.0))
    return init


def best_single(prior: np.ndarray, config: RouterConfig, depth_cost: float = 0.0) -> int:
    """The pool head best alone by ``prior`` (its mean nDCG@10 on the training queries) less the price of the
    layers its pass runs."""
    P = len(config.pool)
    return int(np.argmax(prior[:P] - depth_cost * signal_depths(config)[:P]))


def signal_depths(config: RouterConfig) -> np.ndarray:
    """Fraction of the layers a pass over each routable signal alone runs (the first stage runs none)."""
    depth = [layers_run([h], config.num_layers) for h in config.pool_heads]
    return np.array(depth + [0.0] * config.use_first_stage)


def _fit_split(config: RouterConfig, train_q: list[Query], dev_q: list[Query], emb: dict[str, torch.Tensor],
               s: FitSettings, start: list[int] | None = None) -> tuple[Router, dict[str, Any]]:
    """Prior, pseudo labels, starting point and training on one (train, dev) split. ``start``: the listwise
    starting selection (default: chosen on this split's training queries)."""
    prior = prior_quality(train_q)
    n = len(prior)
    labels = label_queries(train_q, prior, max_heads=s.label_max_heads)
    y = np.zeros((len(train_q), n))
    for i, q in enumerate(train_q):
        if s.labels == "soft":
            sig = q.single if q.first_stage is None else np.vstack([q.single, q.first_stage[None]])
            y[i] = ndcg_at_k(sig, q.gains, q.ideal)
        elif s.labels == "greedy":
            y[i, labels[q.qid][0] if q.qid in labels else []] = 1.0
        else:
            raise ValueError(f"unknown labels {s.labels!r}; use 'greedy' or 'soft'")
    if s.objective == "listwise":
        init = residual_start(prior, config, s.depth_cost,
                              _start_signals(config, train_q, s) if start is None else start)
        config.training["start_signals"] = [int(i) for i in np.flatnonzero(init > 0.5)]
    elif s.labels == "soft":
        init = np.clip(prior, 1e-3, 1 - 1e-3)
    else:  # how often each signal is in a pseudo label (smoothed)
        init = (y.sum(0) + 0.1) / (len(labels) + 1.0)
    config.training.update({"train_queries": len(train_q), "labelled": len(labels), "dev_queries": len(dev_q),
                            "mean_label_size": float(np.mean([len(v[0]) for v in labels.values()] or [0]))})
    router, history = train_router(config, init, torch.cat([emb[q.qid] for q in train_q]), train_q, y,
                                   torch.cat([emb[q.qid] for q in dev_q]), dev_q, s)
    return router, {"history": history, "labels": labels, "dev_ids": [q.qid for q in dev_q],
                    "prior": prior.tolist()}
