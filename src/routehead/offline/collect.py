"""Compute and store ``S[layer, head, doc]`` for every query of a collection split, once.

All re-rankers are evaluated from the same stored forward passes, so a comparison never mixes runs, and a
rerun (or a new re-ranker) costs no model time. Runs are resumable (queries already stored are skipped) and
shardable (``shard``/``num_shards`` split the queries across processes or machines).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from routehead.engine.order import prompt_order
from routehead.engine.scorer import HeadScorer, HeadScores
from routehead.offline.bm25 import first_stage
from routehead.offline.data import Collection
from routehead.offline.store import Entry, HeadScoreStore, Tokens, shard_filter
from routehead.settings import SCORING


def store_root() -> Path:
    return Path(os.environ.get("ROUTEHEAD_STORE", "results/cache"))


@dataclass
class ScoredCollection:
    """A collection split with its first stage (depth ``depth``) and the stored S of its top ``top_k``."""

    collection: Collection
    first_stage: dict[str, list[tuple[str, float]]]
    entries: dict[str, Entry]
    settings: dict[str, Any]


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
    fs = {q: c for q, c in fs.items() if q in keep}
    return ScoredCollection(collection=collection, first_stage=fs, entries=entries, settings=settings)

