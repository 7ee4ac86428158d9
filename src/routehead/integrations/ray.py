"""Scale-out on Ray (``pip install 'routehead[ray]'``): re-rank a Ray Dataset, and compute a collection's stored S
with one model per actor, for query sets one machine cannot finish.

- :func:`rerank_dataset`: a Ray Data ``map_batches`` stage with a stateful scorer per actor (the model loads once
  per actor, not per batch). Rows ``query_id, query, doc_ids, docs[, first_stage_scores]`` in; the same rows out
  with ``ranked_doc_ids``, ``scores`` (aligned with ``ranked_doc_ids``, best first) and ``heads`` (this query's
  routed or static ``[layer, head]`` pairs; empty for ICR). :func:`write_trec_run` writes them as a TREC run.
- :func:`score_collection_ray` (``routehead score --ray N [--address ADDR]``): actor ``i`` of ``N`` runs what
  ``routehead score --shard i/N`` runs (the CLI's own scoring function, so every ``score`` option and any change
  to the scoring is used as is: :func:`routehead.offline.collect.score_collection` on the queries
  :func:`routehead.offline.store.shard_filter` gives shard ``i``), all into the same store. The store's shard
  files are written atomically under unique names, so actors never overwrite each other, a dead actor loses only
  its unflushed queries, and a rerun skips every stored query: nothing lost, nothing duplicated. On a multi-node
  cluster the store root (``$ROUTEHEAD_STORE``) must be a file system every node sees.

This module is ``routehead.integrations.ray``; it imports the real Ray lazily (absolute imports), only when called.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from routehead.errors import RouteheadError
from routehead.settings import SCORING

if TYPE_CHECKING:
    from routehead.api import Ranking
    from routehead.offline.job import ScoreJob

__all__ = ["rerank_dataset", "rerank_many", "score_collection_ray", "score_command", "score_job", "write_trec_run"]

OUTPUT_COLUMNS = ("ranked_doc_ids", "scores", "heads")


def _ray(address: str | None = None) -> Any:
    """The real Ray, started locally (or connected to ``address``) unless a session is already running."""
    from routehead.integrations import require

    ray = require("ray", "ray")
    if not ray.is_initialized():
        if address is None:
            ray.init(include_dashboard=False, log_to_driver=True)
        else:
            ray.init(address=address)
    return ray


def rerank_many(rr: Any, items: Sequence[tuple], batch_size: int = SCORING.rerank_batch_size) -> list[Ranking]:
    """``Reranker.rerank_many`` where the installed Reranker has it (prompts share forward passes), else one
    ``rerank`` call per item; the results are the same either way."""
    many = getattr(rr, "rerank_many", None)
    if many is not None:
        return list(many(list(items), batch_size=batch_size))
    return [rr.rerank(*item) for item in items]


class _RerankBatch:
    """The stateful callable of :func:`rerank_dataset`: one Reranker per Ray actor, reused for every batch."""

    def __init__(self, settings: dict[str, Any], batch_size: int) -> None:
        from routehead.integrations import load_reranker

        self.reranker = load_reranker(**settings)
        self.batch_size = batch_size

    def __call__(self, batch: Any) -> Any:
        import pyarrow as pa

        cols = batch.column_names
        for need in ("query", "doc_ids", "docs"):
            if need not in cols:
                raise RouteheadError(f"rerank_dataset rows need a {need!r} column; got {cols}")
        queries = batch.column("query").to_pylist()
        doc_ids = batch.column("doc_ids").to_pylist()
        docs = batch.column("docs").to_pylist()
        fss = batch.column("first_stage_scores").to_pylist() if "first_stage_scores" in cols else [None] * len(docs)
        items: list[tuple] = []
        for q, ids, ds, fs in zip(queries, doc_ids, docs, fss):
            if len(ids) != len(ds):
                raise RouteheadError(f"query {q!r}: {len(ids)} doc_ids but {len(ds)} docs")
            items.append((q, [str(d) for d in ds]) if fs is None else (q, [str(d) for d in ds], [float(s) for s in fs]))
        nonempty = [k for k, it in enumerate(items) if it[1]]
        rankings: list[Any] = [None] * len(items)
        for k, r in zip(nonempty, rerank_many(self.reranker, [items[k] for k in nonempty], self.batch_size)):
            rankings[k] = r
        ranked, scores, heads = [], [], []
        for ids, r in zip(doc_ids, rankings):
            ranked.append([str(ids[i]) for i in r.indices] if r is not None else [])
            scores.append([float(s) for s in r.scores] if r is not None else [])
            heads.append([[int(a), int(b)] for a, b in r.heads] if r is not None and r.heads is not None else [])
        for name in OUTPUT_COLUMNS:
            if name in cols:
                batch = batch.drop_columns([name])
        batch = batch.append_column("ranked_doc_ids", pa.array(ranked, type=pa.list_(pa.string())))
        batch = batch.append_column("scores", pa.array(scores, type=pa.list_(pa.float64())))
        return batch.append_column("heads", pa.array(heads, type=pa.list_(pa.list_(pa.int64()))))


def rerank_dataset(ds: Any, model: str | Callable[[], Any] | None = None, method: str | None = None, *,
                   concurrency: int = 1, num_gpus: float = 0, num_cpus: float | None = None,
                   batch_size: int = SCORING.rerank_batch_size,
                   router: str | Path | None = None, heads: Any = None, max_doc_tokens: int | None = None,
                   instruction: str | None = None, device: str | None = None, dtype: str | None = None,
                   max_chunks_per_doc: int | None = None) -> Any:
    """Re-rank every row of a Ray Dataset with ``concurrency`` actors, each holding one model.

    ``model`` is a name, path or hub id (None: the embedded default) or a zero-argument factory returning a
    ``LoadedModel`` or a ``Reranker``: it is built inside each actor, so nothing large is pickled. ``batch_size``
    rows go to an actor at a time and share forward passes where the Reranker has ``rerank_many``. With
    ``num_gpus=1`` each actor gets a GPU (and the model goes to CUDA). Returns the lazy output Dataset.
    """
    ray = _ray()
    if concurrency < 1 or batch_size < 1:
        raise RouteheadError(f"concurrency and batch_size must be >= 1, got {concurrency} and {batch_size}")
    settings = dict(model=model, method=method, router=router, heads=heads, max_doc_tokens=max_doc_tokens,
                    instruction=instruction, device=device, dtype=dtype, max_chunks_per_doc=max_chunks_per_doc)
    remote: dict[str, Any] = {"num_gpus": num_gpus} if num_gpus else {}
    if num_cpus is not None:
        remote["num_cpus"] = num_cpus
    return ds.map_batches(_RerankBatch, fn_constructor_kwargs={"settings": settings, "batch_size": batch_size},
                          batch_size=batch_size, batch_format="pyarrow",
                          compute=ray.data.ActorPoolStrategy(size=concurrency), **remote)


def write_trec_run(rows_or_ds: Any, path: str | Path, run_name: str = "routehead") -> int:
    """Write re-ranked rows (a Ray Dataset or any iterable of dicts with ``query_id``, ``ranked_doc_ids`` and
    ``scores``) as a TREC run file; returns the number of queries written.

    Uses :func:`routehead.offline.trec.write_run`, so the file matches every other run routehead writes.
    """
    from routehead.offline.trec import write_run

    rows: Iterable[dict] = rows_or_ds.iter_rows() if hasattr(rows_or_ds, "iter_rows") else rows_or_ds
    run: dict[str, dict[str, float]] = {}
    for row in rows:
        qid = str(row["query_id"])
        if qid in run:
            raise RouteheadError(f"query {qid!r} appears twice in the re-ranked rows")
        run[qid] = {str(d): float(s) for d, s in zip(row["ranked_doc_ids"], row["scores"])}
    write_run(path, run, run_name)
    return len(run)


# -- computing a collection's stored S with Ray actors ----------------------------------------------------------
# what an actor needs from the driver's environment to resolve the same store, caches and hub settings
_FORWARDED_ENV = ("ROUTEHEAD_", "HF_", "TRANSFORMERS_", "TOKENIZERS_PARALLELISM")


def score_job(data: str | Path, split: str = "test", **options: Any) -> ScoreJob:
    """The job ``routehead score --data DATA --split SPLIT`` runs, with ``options`` (CLI names with underscores:
    ``model``, ``top_k``, ``max_queries``, ``batch_size``, ...) set; every other option keeps its default (one
    :class:`routehead.offline.job.ScoreJob` for both), so the Python API and the command line can never build
    different stores."""
    from routehead.offline.job import ScoreJob

    if "shard" in options:
        raise RouteheadError("routehead score has no option --shard to set here (Ray splits the queries itself)")
    return ScoreJob(data=str(data), split=split).with_options(**options)


class _ShardScorer:
    """One Ray actor: runs ``routehead score --shard i/N`` (the CLI's own scoring function) in the driver's
    working directory and environment, so relative paths, the store root and the model cache resolve alike."""

    def __init__(self, cwd: str, env: dict[str, str], threads: int | None, setup: Callable[[], Any] | None) -> None:
        os.environ.update(env)
        if os.path.isdir(cwd):
            os.chdir(cwd)
        if threads:
            import torch

            torch.set_num_threads(threads)
        if setup is not None:
            setup()

    def run(self, job: ScoreJob, shard: int, num_shards: int) -> dict[str, Any]:
        t0 = time.perf_counter()
        # loads the model (once: one shard per actor), scores the missing queries, stores
        sc, _ = dataclasses.replace(job, shard=(shard, num_shards), progress=False).run()
        return {"shard": shard, "stored": len(sc.entries), "settings": sc.settings, "collection": sc.collection.name,
                "seconds": time.perf_counter() - t0, "pid": os.getpid()}


def score_collection_ray(data: str | Path, split: str = "test", *, actors: int | None = None,
                         num_gpus: float | None = None, address: str | None = None, max_retries: int = 0,
                         progress: bool = False, actor_setup: Callable[[], Any] | None = None,
                         **options: Any) -> dict[str, Any]:
    """``routehead score`` on Ray: the store equals a single-process run's (same queries, same arrays).

    ``options`` are ``routehead score``'s (``model``, ``top_k``, ``max_queries``, ``max_doc_tokens``,
    ``batch_size``, ``device``, ...; see :func:`score_job`). ``actors`` defaults to one per GPU of the cluster
    (each with ``num_gpus=1``), else one; CPU actors share the cluster's CPUs as torch threads. ``max_retries``
    > 0 restarts a dead actor and retries its shard (stored queries are skipped). With 0, a dead actor's shard
    is reported after the others finish, as a RouteheadError saying to rerun: the rerun scores only what is
    missing. ``actor_setup``: a zero-argument callable each actor runs first (logging, torch settings, tests'
    fault injection). Returns ``{"collection", "stored", "actors", "seconds", "shards"}``.
    """
    return _run_shards(score_job(data, split, **options), actors=actors, num_gpus=num_gpus, address=address,
                       max_retries=max_retries, progress=progress, actor_setup=actor_setup)


def _run_shards(job: ScoreJob, actors: int | None, num_gpus: float | None, address: str | None,
                max_retries: int, progress: bool, actor_setup: Callable[[], Any] | None) -> dict[str, Any]:
    ray = _ray(address)
    resources = ray.cluster_resources()
    if num_gpus is None:
        num_gpus = 1.0 if resources.get("GPU", 0) else 0.0
    n = int(actors) if actors is not None else max(1, int(resources.get("GPU", 0) // num_gpus) if num_gpus else 1)
    if n < 1:
        raise RouteheadError(f"need at least one actor, got {n}")
    threads = None if num_gpus else max(1, int(resources.get("CPU", 1)) // n)
    opts: dict[str, Any] = {"num_cpus": threads or 1, "max_restarts": max_retries, "max_task_retries": max_retries}
    if num_gpus:
        opts["num_gpus"] = num_gpus
    env = {k: v for k, v in os.environ.items() if k.startswith(_FORWARDED_ENV)}
    actor_cls = ray.remote(**opts)(_ShardScorer)
    handles = [actor_cls.remote(os.getcwd(), env, threads, actor_setup) for _ in range(n)]
    t0 = time.perf_counter()
    pending = {h.run.remote(job, i, n): i for i, h in enumerate(handles)}
    done: list[dict[str, Any]] = []
    failed: list[tuple[int, str]] = []
    try:
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            i = pending.pop(ready[0])
            try:
                out = ray.get(ready[0])
            except (ray.exceptions.RayError, RouteheadError) as exc:
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
                failed.append((i, f"{type(exc).__name__}: {first}"))
                continue
            done.append(out)
            if progress:
                print(f"shard {i}/{n}: {out['stored']} queries in the store after {out['seconds']:.1f} s", flush=True)
    finally:
        for h in handles:
            ray.kill(h)
    seconds = time.perf_counter() - t0
    if failed:
        shards = ", ".join(f"{i}/{n}" for i, _ in failed)
        raise RouteheadError(f"Ray shard(s) {shards} failed ({failed[0][1]}); the queries stored so far are kept: "
                             f"rerun the same command to score only the missing ones")
    if any(d["settings"] != done[0]["settings"] for d in done):
        raise RouteheadError("Ray actors stored under different settings (different model files or library "
                             "versions on the nodes?); check the store")
    return {"collection": done[0]["collection"], "stored": max(d["stored"] for d in done), "actors": n,
            "seconds": seconds, "shards": sorted(done, key=lambda d: d["shard"])}


def score_command(job: ScoreJob, actors: int, address: str | None) -> None:
    """``routehead score --ray [N] [--address ADDR]``: the same store as ``routehead score``, filled by N actors
    (``actors`` 0: one per GPU, else one)."""
    if tuple(job.shard) != (0, 1):
        raise RouteheadError("--ray splits the queries itself; drop --shard")
    try:
        import ray  # noqa: F401
    except ImportError:
        raise RouteheadError("routehead score --ray needs Ray: pip install 'routehead[ray]'") from None
    out = _run_shards(job, actors=actors if actors and actors > 0 else None, num_gpus=None,
                      address=address, max_retries=0, progress=job.progress, actor_setup=None)
    print(f"{out['stored']} queries stored for {out['collection']}/{job.split} "
          f"({out['actors']} Ray actor{'s' if out['actors'] != 1 else ''}, {out['seconds']:.1f} s)")
