"""Compute and store ``S[layer, head, doc]`` for every query of a collection split, once.

All re-rankers are evaluated from the same stored forward passes, so a comparison never mixes runs, and a
rerun (or a new re-ranker) costs no model time. Runs are resumable (queries already stored are skipped) and
shardable (``shard``/``num_shards`` split the queries across processes or machines).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from routehead.bm25 import first_stage
from routehead.data import Collection
from routehead.scorer import HeadScorer
from routehead.store import Entry, HeadScoreStore, shard_filter


def store_root() -> Path:
    return Path(os.environ.get("ROUTEHEAD_STORE", "results/cache"))


@dataclass
class ScoredCollection:
    """A collection split with its first stage (depth ``depth``) and the stored S of its top ``top_k``."""

    collection: Collection
    first_stage: dict[str, list[tuple[str, float]]]
    entries: dict[str, Entry]
    settings: dict[str, Any]


def store_settings(scorer_settings: dict[str, Any], collection: Collection, top_k: int) -> dict[str, Any]:
    return {**scorer_settings, "collection": collection.name, "split": collection.split, "top_k": top_k,
            "first_stage": "candidates.tsv" if collection.candidates is not None else "bm25s-lucene-stem-en"}


def select_queries(collection: Collection, max_queries: int | None = None) -> list[str]:
    """Queries in file order; ``max_queries`` keeps a prefix (for quick runs)."""
    qids = list(collection.queries)
    return qids[:max_queries] if max_queries else qids


def score_collection(collection: Collection, scorer: HeadScorer | None, scorer_settings: dict[str, Any],
                     top_k: int = 20, depth: int = 100, max_queries: int | None = None, shard: int = 0,
                     num_shards: int = 1, root: Path | None = None, progress: bool = True,
                     batch_size: int = 1) -> ScoredCollection:
    """Score the missing queries (if a scorer is given) and return everything stored for this setting.

    ``scorer_settings`` identifies the store even when ``scorer`` is None (evaluation from the store alone).
    ``batch_size`` prompts share a forward pass (:meth:`HeadScorer.score_many`; same scores, more queries/s
    where one prompt leaves a GPU idle).
    """
    fs = first_stage(collection, max(depth, top_k))
    settings = store_settings(scorer_settings, collection, top_k)
    qids = select_queries(collection, max_queries)
    store = HeadScoreStore(root or store_root(), settings)
    todo = [q for q in shard_filter(qids, shard, num_shards) if q not in store.done()]
    if todo and scorer is not None:
        todo = [q for q in todo if fs[q][:top_k]]  # a query without candidates has nothing to score
        with store, tqdm(total=len(todo), desc=f"scoring {collection.name}/{collection.split}",
                         disable=not progress) as bar:
            for k in range(0, len(todo), batch_size):
                chunk = todo[k:k + batch_size]
                doc_ids = [[d for d, _ in fs[qid][:top_k]] for qid in chunk]
                items = [(collection.queries[qid], [collection.doc_text(d) for d in ids])
                         for qid, ids in zip(chunk, doc_ids)]
                for qid, ids, S in zip(chunk, doc_ids, scorer.score_many(items, batch_size=batch_size)):
                    store.add(qid, ids, S.calibrated.numpy(), S.raw.numpy())
                bar.update(len(chunk))
    keep = set(qids)
    entries = {q: e for q, e in store.load().items() if q in keep}
    fs = {q: c for q, c in fs.items() if q in keep}
    return ScoredCollection(collection=collection, first_stage=fs, entries=entries, settings=settings)
