"""Dynamic batching: one bounded queue in front of one worker thread per model replica.

Why this shape: a PyTorch model is not thread-safe and one forward pass over several prompts costs less than
several passes (``Reranker.rerank_many``), so requests that arrive while a replica is busy wait in a queue
and the next free replica takes as many of them as fit a token budget into one call.  Nothing waits on a
timer to fill a batch: under light load a request runs alone at once, under heavy load batches grow by
themselves.

- Admission: at most ``max_concurrent_requests`` requests are queued or running; one more raises
  :class:`QueueFull` at once (the app answers 429 with Retry-After), so memory stays bounded.  And by cost
  (:mod:`~routehead.service.load`): a request that the tokens queued ahead of it, at the measured tokens/s, would
  keep past its deadline raises :class:`QueueFull` with the estimated ``retry_after`` instead of waiting for a 504.
- Batch forming: the oldest queued request is always taken (a request over the budget runs alone, never
  starves); later ones join while ``requests x longest prompt`` (the padded cost of one pass, in the tokens
  the reranker counted with ``prompt_tokens``) stays within
  ``max_batch_tokens`` and the batch has fewer than ``max_batch_requests``.  Only requests asking for the same
  evidence size and the same ``max_chunks_per_doc`` share a call.  And only while the call, at the measured
  tokens/s, still ends before the earliest deadline of the requests in it: a call answers all its requests at
  its end, so a request joining it delays the others (measured: without this rule, 32 clients on the CPU box
  formed calls of 6-8 requests that outlived the first requests' deadlines, 27 504s).
- Failure isolation: if a batched call raises, its requests are retried one at a time, so only the request
  that breaks the model fails and the others get the answer they would have had alone.
- Cancellation: a request whose awaiting task is cancelled (client gone) or times out (504) is removed from the
  queue.  If it is already running, its answer is dropped; and once no request of the running call is still
  awaited, the call is stopped at the model's next layer boundary (the reranker's ``should_stop``, where it
  takes one: :func:`~routehead.service.protocol.takes_should_stop`), counted in
  ``routehead_cancelled_passes_total`` and logged in one line, and the replica takes the next queued work.
  Requests still awaited keep their call running: a batch stops only when all of it is abandoned.
- Drain (SIGTERM): :meth:`Batcher.drain` refuses new work; the replicas keep serving the queue, the queued
  requests they are not expected to reach before the drain's deadline get :class:`ShuttingDown` at once, and at
  the deadline every request still waiting (queued or running) gets it: each is answered within the grace.  A
  running call whose requests all got that 503 is awaited by nobody, so the Cancellation rule above stops it at its
  next layer boundary (counted like any stopped call): the replica is free before :meth:`Batcher.close` waits for
  it, rather than running a pass nobody will read to its end (tested on a tiny model:
  ``tests/service/test_cancel.py``).
- Shutdown: :meth:`Batcher.close` refuses new work, fails what is still queued with :class:`ShuttingDown`,
  and waits (up to its timeout) for each replica to finish the batch it is running.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from routehead.aio import model_lock
from routehead.errors import PassCancelled
from routehead.service.config import ServiceSettings
from routehead.service.load import Throughput, Wait, estimate
from routehead.service.protocol import RerankerLike, takes_chunks, takes_should_stop

logger = logging.getLogger("routehead.service")


class QueueFull(Exception):
    """The service already holds ``max_concurrent_requests`` requests (``retry_after`` None), or the queue ahead
    would keep this one past its deadline (``retry_after``: the estimated seconds until it would fit)."""

    def __init__(self, message: str, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class ShuttingDown(Exception):
    """The service is draining (SIGTERM) and takes no new work."""


@dataclass
class Work:
    """One re-rank request as the model sees it."""

    query: str
    documents: list[str]
    first_stage_scores: list[float] | None = None
    evidence: int = 0
    tokens: int = 0
    max_chunks_per_doc: int | None = None  # the request's chunking (None: the reranker's own)


@dataclass
class Outcome:
    """A finished request: the reranker's ranking and where its time went."""

    ranking: Any
    queue_s: float
    inference_s: float
    batch_size: int


@dataclass(eq=False)
class _Job:
    work: Work
    future: asyncio.Future[Outcome]
    loop: asyncio.AbstractEventLoop
    enqueued: float = field(default_factory=time.perf_counter)
    started: float = 0.0
    cancelled: bool = False
    deadline: float | None = None  # time.perf_counter() when its caller stops waiting (504)


class _Replica:
    """One model copy (a :class:`~routehead.service.protocol.RerankerLike`) and its name."""

    def __init__(self, reranker: RerankerLike, name: str) -> None:
        self.reranker = reranker
        self.name = name
        self.stoppable = takes_should_stop(reranker)
        self.chunks = takes_chunks(reranker)

    def _keywords(self, should_stop: Callable[[], bool] | None, work: Work) -> dict[str, Any]:
        """The optional keywords this reranker takes: ``should_stop`` and the work's ``max_chunks_per_doc``."""
        out: dict[str, Any] = {"should_stop": should_stop} if self.stoppable and should_stop is not None else {}
        if self.chunks and work.max_chunks_per_doc is not None:
            out["max_chunks_per_doc"] = work.max_chunks_per_doc
        return out

    def rerank_one(self, work: Work, should_stop: Callable[[], bool] | None = None) -> Any:
        with model_lock(self.reranker):  # also excludes Reranker.arerank callers sharing this model
            return self.reranker.rerank(work.query, work.documents, first_stage_scores=work.first_stage_scores,
                                        routed_heads=True, evidence=work.evidence, **self._keywords(should_stop, work))

    def rerank_batch(self, works: Sequence[Work], should_stop: Callable[[], bool] | None = None) -> list[Any]:
        """One ``rerank_many`` call for several requests (one alone goes through ``rerank``)."""
        if len(works) == 1:
            return [self.rerank_one(works[0], should_stop)]
        items = [(w.query, w.documents) if w.first_stage_scores is None
                 else (w.query, w.documents, w.first_stage_scores) for w in works]
        with model_lock(self.reranker):
            out = list(self.reranker.rerank_many(items, batch_size=len(items), evidence=works[0].evidence,
                                                 **self._keywords(should_stop, works[0])))
        if len(out) != len(works):
            raise RuntimeError(f"rerank_many returned {len(out)} rankings for {len(works)} requests")
        return out


class Batcher:
    """The queue and its workers (see the module docstring).  Submit from the event loop's thread only."""

    def __init__(self, replicas: Sequence[RerankerLike], settings: ServiceSettings | None = None, *,
                 metrics: Any = None, names: Sequence[str] | None = None) -> None:
        """``settings``: ``max_batch_tokens``, ``max_batch_requests``, ``max_concurrent_requests`` and
        ``batching`` (off: one request per call) are read; the defaults are :class:`ServiceSettings`'."""
        if not replicas:
            raise ValueError("at least one reranker replica is needed")
        settings = settings or ServiceSettings()
        names = list(names) if names is not None else [f"replica-{i}" for i in range(len(replicas))]
        self.replicas = [_Replica(r, n) for r, n in zip(replicas, names)]
        self.max_batch_tokens = settings.max_batch_tokens
        self.max_batch_requests = settings.max_batch_requests if settings.batching else 1
        self.max_concurrent_requests = settings.max_concurrent_requests
        self.metrics = metrics
        self.admitted = 0  # queued + running, counted on the event loop's thread
        self.throughput = Throughput()  # tokens/s of one replica, measured on the calls that served requests
        self._queue: collections.deque[_Job] = collections.deque()
        self._running: dict[int, tuple[int, float, list[_Job]]] = {}  # worker thread: (tokens, start, batch)
        self._cond = threading.Condition()
        self._closed = False
        self._draining = False
        self._threads: list[threading.Thread] = []
        self._busy = 0

    # -- lifecycle -----------------------------------------------------------------------------------------
    def start(self, warmup: Work | None = None, on_ready: Callable[[], None] | None = None,
              on_error: Callable[[BaseException], None] | None = None) -> None:
        """Start one worker thread per replica; each runs ``warmup`` first, then ``on_ready`` once all have."""
        remaining = [len(self.replicas)]
        lock = threading.Lock()

        def run(replica: _Replica) -> None:
            if warmup is not None:
                try:
                    replica.rerank_one(warmup)
                except BaseException as exc:  # a replica that cannot rerank must not pretend to be ready
                    logger.exception("warm-up failed on %s", replica.name)
                    if on_error is not None:
                        on_error(exc)
                    return
            with lock:
                remaining[0] -= 1
                if remaining[0] == 0 and on_ready is not None:
                    on_ready()
            self._work(replica)

        for replica in self.replicas:
            t = threading.Thread(target=run, args=(replica,), name=f"routehead-{replica.name}", daemon=True)
            t.start()
            self._threads.append(t)

    def close(self, timeout: float = 5.0) -> None:
        """Refuse new work, fail what is queued, let running batches finish (up to ``timeout`` seconds)."""
        with self._cond:
            self._closed = True
            left = list(self._queue)
            self._queue.clear()
            self._cond.notify_all()
        for job in left:
            self._resolve(job, error=ShuttingDown("the service is shutting down"))
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        self._update_gauges()

    def drain(self, deadline: float) -> None:
        """Refuse new work and answer every admitted request by ``deadline`` (a ``time.perf_counter()`` value):
        the queued requests the replicas are not expected to reach in time get :class:`ShuttingDown` now, the
        others keep their place, and whatever is still waiting at the deadline gets it then.  Call on the event
        loop's thread."""
        self._draining = True
        rate, now = self.throughput.rate, time.perf_counter()
        late: list[_Job] = []
        with self._cond:
            if rate is not None:
                capacity = rate * len(self.replicas)
                ahead = self._running_tokens(now, rate)
                kept: collections.deque[_Job] = collections.deque()
                for job in self._queue:
                    ahead += job.work.tokens
                    (kept if now + ahead / capacity <= deadline else late).append(job)
                self._queue = kept
        for job in late:
            self._resolve(job, error=ShuttingDown("the service is shutting down; this request could not be "
                                                  "answered before the grace period ends"))
        self._update_gauges()
        asyncio.get_running_loop().call_later(max(0.0, deadline - now), self._expire)

    def _expire(self) -> None:
        """The drain's deadline: every request still queued or running gets :class:`ShuttingDown`.  Each waiter
        then leaves (:meth:`submit` marks its job cancelled), so a running call stops at its next layer boundary
        where its reranker takes ``should_stop``."""
        with self._cond:
            waiting = list(self._queue) + [job for _, _, batch in self._running.values() for job in batch]
            self._queue.clear()
        for job in waiting:
            self._resolve(job, error=ShuttingDown("the service is shutting down; the grace period ended before "
                                                  "this request was answered"))
        self._update_gauges()

    def _running_tokens(self, now: float, rate: float) -> float:
        """The tokens the running batches have left, at ``rate`` (call with the lock held)."""
        return sum(max(0.0, tokens - (now - start) * rate) for tokens, start, _ in self._running.values())

    def estimate_wait(self, tokens: int) -> Wait | None:
        """The estimated wait of a request of ``tokens`` queued now (None before any model call was measured)."""
        rate = self.throughput.rate
        if rate is None:
            return None
        with self._cond:
            ahead = sum(j.work.tokens for j in self._queue if not j.cancelled)
            ahead += self._running_tokens(time.perf_counter(), rate)
        return estimate(ahead, tokens, rate, len(self.replicas))

    @property
    def queued(self) -> int:
        return len(self._queue)

    @property
    def busy(self) -> int:
        return self._busy

    # -- the event loop side -------------------------------------------------------------------------------
    async def submit(self, work: Work, timeout: float | None = None) -> Outcome:
        """Queue ``work`` and wait for its outcome.

        Raises :class:`QueueFull` (over ``max_concurrent_requests``, or when the work queued ahead would keep it
        past ``timeout``), :class:`ShuttingDown`, ``TimeoutError`` after ``timeout`` seconds, or whatever the
        reranker raised for this request.  If the awaiting task is cancelled or times out, the request leaves the
        queue.
        """
        if self._closed or self._draining:
            raise ShuttingDown("the service is shutting down")
        if self.admitted >= self.max_concurrent_requests:
            raise QueueFull(f"{self.admitted} requests are already queued or running "
                            f"(max_concurrent_requests={self.max_concurrent_requests})")
        wait = self.estimate_wait(work.tokens)
        if wait is not None and timeout is not None and wait.misses(timeout):
            raise QueueFull(f"the work queued ahead would keep this request about {wait.total_s:.1f} s, past "
                            f"request_timeout_s={timeout:g} (estimated at {self.throughput.rate:.0f} prompt "
                            "tokens/s per replica)", retry_after=wait.retry_after(timeout))
        loop = asyncio.get_running_loop()
        job = _Job(work, loop.create_future(), loop,
                   deadline=None if timeout is None else time.perf_counter() + timeout)
        self.admitted += 1
        try:
            with self._cond:
                if self._closed:
                    raise ShuttingDown("the service is shutting down")
                self._queue.append(job)
                self._cond.notify()
            self._update_gauges()
            return await asyncio.wait_for(job.future, timeout)
        except BaseException:
            self._abandon(job)
            raise
        finally:
            self.admitted -= 1

    def _abandon(self, job: _Job) -> None:
        job.cancelled = True
        with self._cond:
            try:
                self._queue.remove(job)
            except ValueError:
                pass  # already taken by a worker: its answer will be dropped
        self._update_gauges()

    # -- the worker side -----------------------------------------------------------------------------------
    def _take(self) -> list[_Job] | None:
        with self._cond:
            while True:
                while self._queue and self._queue[0].cancelled:
                    self._queue.popleft()
                if self._queue:
                    break
                if self._closed:
                    return None
                self._cond.wait()
            first = self._queue.popleft()
            batch, longest = [first], first.work.tokens
            if self.max_batch_requests > 1:
                kept: collections.deque[_Job] = collections.deque()
                while self._queue:
                    job = self._queue.popleft()
                    if job.cancelled:
                        continue
                    cost = (len(batch) + 1) * max(longest, job.work.tokens)
                    if (len(batch) < self.max_batch_requests and job.work.evidence == first.work.evidence
                            and job.work.max_chunks_per_doc == first.work.max_chunks_per_doc
                            and cost <= self.max_batch_tokens and self._in_time(batch + [job], cost)):
                        batch.append(job)
                        longest = max(longest, job.work.tokens)
                    else:
                        kept.append(job)
                self._queue = kept
            now = time.perf_counter()
            for job in batch:
                job.started = now
            self._running[threading.get_ident()] = (sum(j.work.tokens for j in batch), now, batch)
            self._busy += 1
            return batch

    def _in_time(self, batch: list[_Job], cost: int) -> bool:
        """Whether one call over ``batch`` (``cost`` padded tokens), started now at the measured rate, ends
        before the earliest deadline among its requests (True before any rate is measured)."""
        rate = self.throughput.rate
        deadlines = [j.deadline for j in batch if j.deadline is not None]
        return rate is None or not deadlines or time.perf_counter() + cost / rate <= min(deadlines)

    def _work(self, replica: _Replica) -> None:
        while True:
            batch = self._take()
            if batch is None:
                return
            try:
                self._update_gauges()
                self._execute(replica, batch)
            finally:
                with self._cond:
                    self._busy -= 1
                    self._running.pop(threading.get_ident(), None)
                self._update_gauges()

    def _execute(self, replica: _Replica, batch: list[_Job]) -> None:
        t0 = time.perf_counter()
        if self.metrics is not None:
            self.metrics.observe_batch(len(batch), sum(j.work.tokens for j in batch))
        try:
            rankings = replica.rerank_batch([j.work for j in batch], lambda: all(j.cancelled for j in batch))
            self._measured(sum(j.work.tokens for j in batch), time.perf_counter() - t0)
            with self._cond:  # done: no longer ahead of anyone (before its requests are answered)
                self._running.pop(threading.get_ident(), None)
        except PassCancelled:
            self._stopped(replica, batch, t0)
            return
        except Exception as exc:
            if len(batch) == 1:
                self._finish(batch[0], t0, 1, error=exc)
                return
            logger.warning("a batch of %d requests failed (%s); retrying them one at a time", len(batch), exc)
            if self.metrics is not None:
                self.metrics.batch_retries.inc()
            for job in batch:
                if job.cancelled:
                    continue
                t1 = time.perf_counter()
                try:
                    ranking = replica.rerank_one(job.work, lambda job=job: job.cancelled)
                except PassCancelled:
                    self._stopped(replica, [job], t1)
                except Exception as one_exc:
                    self._finish(job, t1, 1, error=one_exc)
                else:
                    self._measured(job.work.tokens, time.perf_counter() - t1)
                    self._finish(job, t1, 1, ranking=ranking)
            return
        for job, ranking in zip(batch, rankings):
            self._finish(job, t0, len(batch), ranking=ranking)

    def _stopped(self, replica: _Replica, jobs: list[_Job], t0: float) -> None:
        """A call stopped early because none of ``jobs`` is awaited: one log line, the metric; no answer to give
        (each job's waiter has gone), and its partial time is not a throughput measurement.  The line names the
        drain among the reasons: on SIGTERM the stopped calls are those its deadline answered 503."""
        logger.info("stopped a model call of %d request(s) on %s after %.0f ms: no request in it is still awaited "
                    "(client gone, timed out, or answered 503 by the shutdown drain)", len(jobs), replica.name,
                    (time.perf_counter() - t0) * 1000.0)
        if self.metrics is not None:
            self.metrics.cancelled_passes.inc()
        for job in jobs:  # their futures are already done (cancelled or failed); never leave one pending all the same
            self._resolve(job, error=PassCancelled("the request was abandoned"))

    def _measured(self, tokens: int, seconds: float) -> None:
        self.throughput.observe(tokens, seconds)
        if self.metrics is not None and self.throughput.rate is not None:
            self.metrics.throughput.set(self.throughput.rate)

    def _finish(self, job: _Job, t0: float, size: int, ranking: Any = None,
                error: BaseException | None = None) -> None:
        now = time.perf_counter()
        if error is None:
            self._resolve(job, Outcome(ranking, queue_s=job.started - job.enqueued, inference_s=now - t0,
                                       batch_size=size))
        else:
            self._resolve(job, error=error)

    @staticmethod
    def _resolve(job: _Job, outcome: Outcome | None = None, error: BaseException | None = None) -> None:
        def settle() -> None:
            if job.future.done():
                return
            if error is not None:
                job.future.set_exception(error)
            else:
                job.future.set_result(outcome)  # type: ignore[arg-type]

        try:
            job.loop.call_soon_threadsafe(settle)
        except RuntimeError:
            pass  # the event loop is gone (server stopped): nobody is waiting

    def _update_gauges(self) -> None:
        if self.metrics is not None:
            self.metrics.queue_size.set(len(self._queue))
            self.metrics.busy_replicas.set(self._busy)
