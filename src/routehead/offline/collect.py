"""Compute and store ``S[layer, head, doc]`` for every query of a collection split, once.

All re-rankers are evaluated from the same stored forward passes, so a comparison never mixes runs, and a
rerun (or a new re-ranker) costs no model time. Runs are resumable (queries already stored are skipped) and
shardable (``shard``/``num_shards`` split the queries across processes or machines).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from routehead.engine.order import prompt_order
from routehead.engine.scorer import HeadScorer, HeadScores
from routehead.errors import RouteheadError
from routehead.offline.bm25 import first_stage
from routehead.offline.data import Collection
from routehead.offline.store import Entry, HeadScoreStore, Tokens, shard_filter
from routehead.settings import SCORING


def store_root() -> Path:
    return Path(os.environ.get("ROUTEHEAD_STORE", "results/cache"))


@dataclass
class ScoredCollection:
    """A collection split with its first stage (depth ``depth``) and the stored S of its top ``top_k``.

    ``members``: empty for one store; for a view over several (:func:`merge_scored`), the stores it merges, so
    that what is kept per store (the query embeddings' cache) stays with each."""

    collection: Collection
    first_stage: dict[str, list[tuple[str, float]]]
    entries: dict[str, Entry]
    settings: dict[str, Any]
    members: list[ScoredCollection] = field(default_factory=list)


PER_STORE = ("collection", "split", "first_stage")  # settings that may differ between the stores of one merge


def namespace(sc: ScoredCollection) -> str:
    """The prefix of a store's query and document ids in a merged view: ``<collection>/<split>/`` (neither may
    hold a ``/``, as both name store folders)."""
    return f"{sc.collection.name}/{sc.collection.split}/"


def merge_scored(scs: Sequence[ScoredCollection]) -> ScoredCollection:
    """One read-only view over the stored passes of several collection splits, to train on them together.

    Query and document ids become ``<collection>/<split>/<id>``, so two collections' ids (cranfield's "1" and
    cisi's "1") never meet; queries, judgments, first stages and entries are the members' under those ids (the
    arrays are shared, not copied), and everything that reads one store (detection, label search, router
    training, selection scores) reads the view unchanged. The stores must hold passes of one model under one
    prompt, dtype, prompt order and top-k, of whole documents: a router learns what heads do in such passes, and
    one mixing several would learn their differences instead. The view has no folder of its own: query
    embeddings stay cached with each member (:func:`routehead.offline.views.query_embeddings`).
    """
    if not scs:
        raise RouteheadError("merge_scored needs at least one stored collection")
    first = scs[0]
    common = {k: v for k, v in first.settings.items() if k not in PER_STORE}
    seen: set[str] = set()
    for sc in scs:
        name = namespace(sc).rstrip("/")
        if sc.members:
            raise RouteheadError(f"{name} is already a merged view; merge its stores instead")
        if name in seen:
            raise RouteheadError(f"{name} is given twice; a collection split can be merged once")
        seen.add(name)
        if not sc.entries:
            raise RouteheadError(f"{name} has no stored passes (score it first, or leave it out)")
        if sc.settings.get("max_chunks_per_doc", 1) > 1:
            raise RouteheadError(f"{name} was scored with max_chunks_per_doc > 1 (chunked documents); router "
                                 f"training reads stores of whole (truncated) documents")
        own = {k: v for k, v in sc.settings.items() if k not in PER_STORE}
        differ = sorted(k for k in set(own) | set(common) if own.get(k) != common.get(k))
        if differ:
            here = ", ".join(f"{k}={own.get(k)!r}" for k in differ[:4])
            there = ", ".join(f"{k}={common.get(k)!r}" for k in differ[:4])
            raise RouteheadError(f"cannot merge stores made under different settings: {name} has {here}, "
                                 f"{namespace(first).rstrip('/')} has {there} (one model, prompt, dtype, prompt "
                                 f"order and top-k for all)")
    queries, qrels, corpus, fs, entries, warnings = {}, {}, {}, {}, {}, []
    for sc in scs:
        p, c = namespace(sc), sc.collection
        queries.update({p + q: text for q, text in c.queries.items()})
        qrels.update({p + q: {p + d: g for d, g in judged.items()} for q, judged in c.qrels.items()})
        corpus.update({p + d: doc for d, doc in c.corpus.items()})
        fs.update({p + q: [(p + d, s) for d, s in cands] for q, cands in sc.first_stage.items()})
        entries.update({p + q: replace(e, doc_ids=[p + d for d in e.doc_ids]) for q, e in sc.entries.items()})
        warnings += [f"{p}: {w}" for w in c.warnings]
    name, split = "+".join(sc.collection.name for sc in scs), "+".join(sc.collection.split for sc in scs)
    # no folder and no first-stage source of its own: the view is never scored, only read
    coll = Collection(name=name, corpus=corpus, queries=queries, qrels=qrels, candidates=None, path=Path(),
                      split=split, warnings=warnings)
    members = [{"collection": sc.collection.name, "split": sc.collection.split,
                "first_stage": sc.settings.get("first_stage"), "queries": len(sc.entries)} for sc in scs]
    settings = {**common, "collection": name, "split": split, "members": members}
    return ScoredCollection(coll, fs, entries, settings, list(scs))


def store_settings(scorer_settings: dict[str, Any], collection: Collection, top_k: int,
                   doc_order: str = SCORING.doc_order) -> dict[str, Any]:
    return {**scorer_settings, "collection": collection.name, "split": collection.split, "top_k": top_k,
            "first_stage": "candidates.tsv" if collection.candidates is not None else "bm25s-lucene-stem-en",
            "doc_order": doc_order, "tokens": "all-heads-f16", "raw_sum": True}


def entry_tokens(S: HeadScores, perm: list[int]) -> Tokens:
    """Token scores of a prompt-order result, re-laid in candidate (first-stage) order (a chunked document's
    chunks move together, in their own order)."""
    assert S.tokens is not None
    t = S.tokens
    rows = t.rows.numpy()
    bounds = np.concatenate([[0], np.cumsum(t.counts)])
    chunks = S.chunks or [1] * len(perm)
    first = S.chunk_starts()
    where = {doc: j for j, doc in enumerate(perm)}  # candidate -> prompt position
    spans = [first[where[d]] + c for d in range(len(perm)) for c in range(chunks[where[d]])]
    cols = np.concatenate([np.arange(bounds[p], bounds[p + 1]) for p in spans])
    rows = rows[:, cols]
    return Tokens.encode(np.array(t.heads), rows, np.array([t.counts[p] for p in spans]), rows.sum(0),
                         np.array([where[d] for d in range(len(perm))]),
                         np.array([chunks[where[d]] for d in range(len(perm))]) if S.chunks else None)


def select_queries(collection: Collection, max_queries: int | None = None) -> list[str]:
    """Queries in file order; ``max_queries`` keeps a prefix (for quick runs)."""
    qids = list(collection.queries)
    return qids[:max_queries] if max_queries else qids


def score_collection(collection: Collection, scorer: HeadScorer | None, scorer_settings: dict[str, Any],
                     top_k: int = SCORING.top_k, depth: int = SCORING.depth, max_queries: int | None = None,
                     shard: int = 0,
                     num_shards: int = 1, root: Path | None = None, progress: bool = True,
                     batch_size: int = SCORING.batch_size, doc_order: str = SCORING.doc_order,
                     only: Sequence[str] | None = None
                     ) -> ScoredCollection:
    """Score the missing queries (if a scorer is given) and return everything stored for this setting.

    ``scorer_settings`` identifies the store even when ``scorer`` is None (evaluation from the store alone).
    ``batch_size`` prompts share a forward pass (:meth:`HeadScorer.score_many`; same scores, more queries/s
    where one prompt leaves a GPU idle). ``doc_order`` places the candidates in the prompt
    (:mod:`routehead.engine.order`); stored scores are always in candidate order, with each document's prompt position.
    Every head is computed and its token scores kept, so any head selection can be aggregated later exactly
    as inference aggregates it. ``only``: score and return just these queries (e.g. a dev split).
    """
    fs = first_stage(collection, max(depth, top_k))
    settings = store_settings(scorer_settings, collection, top_k, doc_order)
    qids = select_queries(collection, max_queries)
    if only is not None:
        wanted = set(only)
        qids = [q for q in qids if q in wanted]
    store = HeadScoreStore(root or store_root(), settings)
    todo = [q for q in shard_filter(qids, shard, num_shards) if q not in store.done()]
    if todo and scorer is not None:
        todo = [q for q in todo if fs[q][:top_k]]  # a query without candidates has nothing to score
        with store, tqdm(total=len(todo), desc=f"scoring {collection.name}/{collection.split}",
                         disable=not progress) as bar:
            for k in range(0, len(todo), batch_size):
                chunk = todo[k:k + batch_size]
                doc_ids = [[d for d, _ in fs[qid][:top_k]] for qid in chunk]
                perms = [prompt_order(len(ids), doc_order, qid) for qid, ids in zip(chunk, doc_ids)]
                layout = scorer.builder.layout
                items = [(collection.queries[qid], [collection.prompt_text(ids[j], layout) for j in perm])
                         for qid, ids, perm in zip(chunk, doc_ids, perms)]
                results = scorer.score_many(items, batch_size=batch_size, keep_tokens=True)
                for qid, ids, perm, S in zip(chunk, doc_ids, perms, results):
                    back = np.argsort(perm)  # candidate d sits at prompt position back[d]
                    store.add(qid, ids, S.calibrated.numpy()[:, :, back], S.raw.numpy()[:, :, back],
                              entry_tokens(S, perm), raw_sum=S.raw_sum.numpy()[:, :, back])
                bar.update(len(chunk))
    keep = set(qids)
    entries = {q: e for q, e in store.load().items() if q in keep}
    check_order(entries, doc_order, store.path)
    fs = {q: c for q, c in fs.items() if q in keep}
    return ScoredCollection(collection=collection, first_stage=fs, entries=entries, settings=settings)


def check_order(entries: dict[str, Entry], doc_order: str, where: object) -> None:
    """Refuse stored passes whose documents did not stand in the store's order (a store folder copied or renamed
    under another setting's key): read as if they did, every comparison across orders would be silently wrong."""
    for qid, e in entries.items():
        if e.tokens is not None and list(np.argsort(e.tokens.positions, kind="stable")) != prompt_order(
                len(e.doc_ids), doc_order, qid):
            raise RouteheadError(f"the store {where} holds query {qid!r} scored in another prompt order than its "
                                 f"setting ({doc_order!r}); was the folder copied or renamed? score it again")

