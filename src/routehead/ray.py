"""Scale-out on Ray (``pip install 'routehead[ray]'``): re-rank a Ray Dataset, and compute a collection's stored S
with one model per actor, for query sets one machine cannot finish.

- :func:`rerank_dataset`: a Ray Data ``map_batches`` stage with a stateful scorer per actor (the model loads once
  per actor, not per batch). Rows ``query_id, query, doc_ids, docs[, first_stage_scores]`` in; the same rows out
  with ``ranked_doc_ids``, ``scores`` (aligned with ``ranked_doc_ids``, best first) and ``heads`` (this query's
  routed or static ``[layer, head]`` pairs; empty for ICR). :func:`write_trec_run` writes them as a TREC run.
- :func:`score_collection_ray` (``routehead score --ray N [--address ADDR]``): N actors each run
  :func:`routehead.collect.score_collection` on shard ``i`` of ``N`` (:func:`routehead.store.shard_filter`) into
  the same store, exactly as ``routehead score --shard i/N`` would. The store's shard files are written
  atomically under unique names, so actors never overwrite each other, a dead actor loses only its unflushed
  queries, and a rerun skips every stored query: nothing lost, nothing duplicated. On a multi-node cluster the
  store root (``$ROUTEHEAD_STORE``) must be a file system every node sees.

This module is ``routehead.ray``; it imports the real Ray lazily (absolute imports), only when called.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from routehead.errors import RouteheadError

if TYPE_CHECKING:
    from routehead.api import Ranking
    from routehead.data import Collection
    from routehead.model import LoadedModel

__all__ = ["rerank_dataset", "score_collection_ray", "score_command", "write_trec_run"]

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


def rerank_many(rr: Any, items: Sequence[tuple], batch_size: int = 8) -> list[Ranking]:
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


def rerank_dataset(ds: Any, model: str | Callable[[], Any] | None = None, method: str = "route", *,
                   concurrency: int = 1, num_gpus: float = 0, num_cpus: float | None = None, batch_size: int = 8,
                   router: str | Path | None = None, heads: Any = None, max_doc_tokens: int | None = None,
                   instruction: str | None = None, device: str | None = None, dtype: str | None = None) -> Any:
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
                    instruction=instruction, device=device, dtype=dtype)
    remote: dict[str, Any] = {"num_gpus": num_gpus} if num_gpus else {}
    if num_cpus is not None:
        remote["num_cpus"] = num_cpus
    return ds.map_batches(_RerankBatch, fn_constructor_kwargs={"settings": settings, "batch_size": batch_size},
                          batch_size=batch_size, batch_format="pyarrow",
                          compute=ray.data.ActorPoolStrategy(size=concurrency), **remote)


def write_trec_run(rows_or_ds: Any, path: str | Path, run_name: str = "routehead") -> int:
    """Write re-ranked rows (a Ray Dataset or any iterable of dicts with ``query_id``, ``ranked_doc_ids`` and
    ``scores``) as a TREC run file; returns the number of queries written.

    Uses :func:`routehead.data.write_run`, so the file matches every other run routehead writes.
    """
    from routehead.data import write_run

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
def _load_lm(model: Any, device: str | None, dtype: str | None, trust_remote_code: bool) -> LoadedModel:
    from routehead.model import LoadedModel, load_model

    if callable(model) and not isinstance(model, (str, Path)):
        built = model()
        built = getattr(built, "lm", built)  # a factory may return a Reranker
        if not isinstance(built, LoadedModel):
            raise RouteheadError(f"the model factory returned {type(built).__name__}, not a LoadedModel")
        return built
    return load_model(model, device=device, dtype=dtype, trust_remote_code=trust_remote_code)


class _ShardScorer:
    """One Ray actor: a model and its HeadScorer, loaded once, scoring one shard of a collection's queries."""

    def __init__(self, collection: Collection, model: Any, device: str | None, dtype: str | None,
                 trust_remote_code: bool, max_doc_tokens: int | None, threads: int | None) -> None:
        import torch

        from routehead.scorer import HeadScorer

        if threads:
            torch.set_num_threads(threads)
        self.collection = collection
        self.scorer = HeadScorer(_load_lm(model, device, dtype, trust_remote_code), max_doc_tokens=max_doc_tokens)

    def settings(self) -> dict[str, Any]:
        return self.scorer.settings()

    def run(self, shard: int, num_shards: int, top_k: int, max_queries: int | None, root: str,
            batch_size: int) -> dict[str, Any]:
        from routehead.collect import score_collection

        t0 = time.perf_counter()
        sc = score_collection(self.collection, self.scorer, self.scorer.settings(), top_k=top_k,
                              max_queries=max_queries, shard=shard, num_shards=num_shards, root=Path(root),
                              progress=False, batch_size=batch_size)
        return {"shard": shard, "stored": len(sc.entries), "seconds": time.perf_counter() - t0, "pid": os.getpid()}


def score_collection_ray(collection: Collection | str | Path, split: str = "test", model: Any = None, *,
                         actors: int | None = None, num_gpus: float | None = None, top_k: int = 20,
                         max_queries: int | None = None, max_doc_tokens: int | None = 160, batch_size: int = 1,
                         root: str | Path | None = None, device: str | None = None, dtype: str | None = None,
                         trust_remote_code: bool = False, max_retries: int = 0, address: str | None = None,
                         progress: bool = False) -> dict[str, Any]:
    """Compute and store S for a collection split with Ray actors; the store equals a single-process run's.

    ``actors`` defaults to one per GPU of the cluster (each with ``num_gpus=1``), else one; CPU actors share the
    cluster's CPUs. ``max_retries`` > 0 restarts a dead actor and retries its shard (stored queries are
    skipped). With 0, a dead actor's shard is reported after the others finish, as a RouteheadError saying to
    rerun: the rerun scores only what is missing. Returns ``{"collection", "queries", "stored", "actors",
    "seconds", "shards"}`` (``seconds``: scoring wall time once every model is loaded).
    """
    from routehead.collect import select_queries, store_root
    from routehead.data import Collection, load_collection

    ray = _ray(address)
    coll = collection if isinstance(collection, Collection) else load_collection(collection, split)
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
    actor_cls = ray.remote(**opts)(_ShardScorer)
    coll_ref = ray.put(coll)
    handles = [actor_cls.remote(coll_ref, model, device, dtype, trust_remote_code, max_doc_tokens, threads)
               for _ in range(n)]
    try:
        settings = ray.get([h.settings.remote() for h in handles])  # every model loaded
        if any(s != settings[0] for s in settings):
            raise RouteheadError("Ray actors built different scorer settings (different model or library "
                                 "versions on the nodes?); refusing to mix them in one store")
        store = str(Path(root or store_root()).resolve())
        t0 = time.perf_counter()
        pending = {h.run.remote(i, n, top_k, max_queries, store, batch_size): i for i, h in enumerate(handles)}
        done: list[dict[str, Any]] = []
        failed: list[tuple[int, str]] = []
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            i = pending.pop(ready[0])
            try:
                out = ray.get(ready[0])
                done.append(out)
                if progress:
                    print(f"shard {i}/{n} done in {out['seconds']:.1f} s", flush=True)
            except (ray.exceptions.RayError, RouteheadError) as exc:
                failed.append((i, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"))
        seconds = time.perf_counter() - t0
    finally:
        for h in handles:
            ray.kill(h)
    if failed:
        shards = ", ".join(f"{i}/{n}" for i, _ in failed)
        raise RouteheadError(f"Ray shard(s) {shards} failed ({failed[0][1]}); the queries stored so far are kept: "
                             f"rerun the same command to score only the missing ones")
    return {"collection": coll.name, "queries": len(select_queries(coll, max_queries)),
            "stored": max(d["stored"] for d in done), "actors": n, "seconds": seconds,
            "shards": sorted(done, key=lambda d: d["shard"])}


def score_command(args: Any) -> None:
    """``routehead score --ray [N] [--address ADDR]``: the same store as ``routehead score``, filled by N actors."""
    if tuple(args.shard) != (0, 1):
        raise RouteheadError("--ray splits the queries itself; drop --shard")
    actors = args.ray if args.ray and args.ray > 0 else None
    try:
        import ray  # noqa: F401
    except ImportError:
        raise RouteheadError("routehead score --ray needs Ray: pip install 'routehead[ray]'") from None
    out = score_collection_ray(args.data, args.split, args.model, actors=actors, top_k=args.top_k,
                               max_queries=args.max_queries, max_doc_tokens=args.max_doc_tokens,
                               batch_size=args.batch_size, device=args.device, dtype=args.dtype,
                               trust_remote_code=args.trust_remote_code, address=args.address,
                               progress=not args.no_progress)
    print(f"{out['stored']} queries stored for {out['collection']}/{args.split} "
          f"({out['actors']} Ray actors, {out['seconds']:.1f} s scoring)")
