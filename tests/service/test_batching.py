"""The batcher alone (no HTTP): batch forming under the token budget, isolation, cancellation, admission."""

from __future__ import annotations

import asyncio
import time

import pytest

from routehead.service.batching import Batcher, QueueFull, ShuttingDown, Work
from routehead.service.config import ServiceSettings
from tests.service.conftest import BOOM, BatchFake, fake_rank


def work(query: str, docs: list[str] | None = None, tokens: int = 100, evidence: int = 0) -> Work:
    return Work(query=query, documents=docs or ["a cat", "a dog", "cat dog"], tokens=tokens, evidence=evidence)


async def _hold_then_submit(batcher: Batcher, fake: BatchFake, works: list[Work], timeout: float = 10):
    """Hold the replica on a first request so the others queue up, then release: they batch together."""
    fake.release.clear()
    fake.entered.clear()
    first = asyncio.ensure_future(batcher.submit(work("first"), timeout))
    await asyncio.to_thread(fake.entered.wait, 5)
    rest = [asyncio.ensure_future(batcher.submit(w, timeout)) for w in works]
    await asyncio.sleep(0.05)
    fake.release.set()
    return await asyncio.gather(first, *rest, return_exceptions=True)


def test_queued_requests_share_one_call_and_match_alone() -> None:
    fake = BatchFake()
    batcher = Batcher([fake], ServiceSettings(max_batch_tokens=10_000, max_batch_requests=8))
    batcher.start()
    works = [work(q) for q in ("cat", "dog", "cat dog", "bird", "a")]
    out = asyncio.run(_hold_then_submit(batcher, fake, works))
    batcher.close()
    assert fake.calls == [1, 5]
    for w, o in zip(works, out[1:]):
        assert o.ranking == fake_rank(w.query, w.documents)
        assert o.batch_size == 5 and o.queue_s >= 0 and o.inference_s >= 0


def test_token_budget_and_request_cap_split_batches() -> None:
    fake = BatchFake()
    # padded cost = requests x longest: 3 x 300 = 900 fits 1000, a 4th would not
    batcher = Batcher([fake], ServiceSettings(max_batch_tokens=1000, max_batch_requests=8))
    batcher.start()
    asyncio.run(_hold_then_submit(batcher, fake, [work(str(i), tokens=300) for i in range(7)]))
    assert fake.calls == [1, 3, 3, 1]
    fake.calls.clear()
    capped = Batcher([BatchFake()], ServiceSettings(max_batch_tokens=10**6, max_batch_requests=2))
    capped.start()
    f2 = capped.replicas[0].reranker
    asyncio.run(_hold_then_submit(capped, f2, [work(str(i)) for i in range(5)]))
    assert f2.calls == [1, 2, 2, 1]
    batcher.close()
    capped.close()


def test_oversized_request_runs_alone_and_batching_off_is_one_by_one() -> None:
    fake = BatchFake()
    batcher = Batcher([fake], ServiceSettings(max_batch_tokens=100, max_batch_requests=8))
    batcher.start()
    asyncio.run(_hold_then_submit(batcher, fake, [work("big", tokens=5000), work("small", tokens=10)]))
    assert fake.calls == [1, 1, 1]
    off_fake = BatchFake()
    off = Batcher([off_fake], ServiceSettings(batching=False))
    off.start()
    asyncio.run(_hold_then_submit(off, off_fake, [work(str(i)) for i in range(3)]))
    assert off_fake.calls == [1, 1, 1, 1]
    batcher.close()
    off.close()


def test_a_model_error_fails_only_its_request() -> None:
    fake = BatchFake()
    batcher = Batcher([fake], ServiceSettings(max_batch_tokens=10_000))
    batcher.start()
    works = [work("cat"), work("dog", ["x", f"{BOOM} dog"]), work("cat dog")]
    out = asyncio.run(_hold_then_submit(batcher, fake, works))
    batcher.close()
    assert fake.calls == [1, 3, 1, 1, 1]  # the batch failed, then each request alone
    assert out[1].ranking == fake_rank("cat", works[0].documents)
    assert isinstance(out[2], RuntimeError)
    assert out[3].ranking == fake_rank("cat dog", works[2].documents)


def test_evidence_requests_are_not_mixed_with_others() -> None:
    fake = BatchFake()
    batcher = Batcher([fake])
    batcher.start()
    works = [work("cat"), work("cat", evidence=2), work("dog"), work("dog", evidence=2)]
    out = asyncio.run(_hold_then_submit(batcher, fake, works))
    batcher.close()
    assert sorted(fake.calls[1:]) == [2, 2]
    assert out[2].ranking.evidence is not None and out[1].ranking.evidence is None


def test_a_lone_request_goes_through_rerank_with_every_argument() -> None:
    fake = BatchFake()
    seen: list[dict] = []
    rerank = fake.rerank
    fake.rerank = lambda q, d, **kw: seen.append(kw) or rerank(q, d, **kw)  # type: ignore[method-assign]
    batcher = Batcher([fake])
    batcher.start()
    out = asyncio.run(batcher.submit(Work(query="dog", documents=["a dog"], first_stage_scores=[1.0], evidence=2)))
    batcher.close()
    assert fake.calls == [1]
    assert seen == [{"first_stage_scores": [1.0], "routed_heads": True, "evidence": 2}]
    assert out.ranking == fake_rank("dog", ["a dog"], evidence=2)


def test_queue_bound_timeout_and_cancellation() -> None:
    fake = BatchFake()
    batcher = Batcher([fake], ServiceSettings(max_concurrent_requests=3))
    batcher.start()

    async def scenario() -> None:
        fake.release.clear()
        fake.entered.clear()
        running = asyncio.ensure_future(batcher.submit(work("held"), 10))
        await asyncio.to_thread(fake.entered.wait, 5)
        queued = asyncio.ensure_future(batcher.submit(work("queued"), 10))
        timed = asyncio.ensure_future(batcher.submit(work("times out"), 0.2))
        await asyncio.sleep(0.05)
        with pytest.raises(QueueFull):
            await batcher.submit(work("one too many"))
        with pytest.raises(TimeoutError):
            await timed
        assert batcher.queued == 1 and batcher.admitted == 2  # the timed-out request left the queue
        queued.cancel()  # the client went away
        await asyncio.sleep(0.05)
        assert batcher.queued == 0 and batcher.admitted == 1
        fake.release.set()
        await running
        await asyncio.sleep(0.1)
        assert fake.calls == [1]  # neither the cancelled nor the timed-out request reached the model

    asyncio.run(scenario())
    batcher.close()


def test_replicas_share_the_queue_and_close_fails_queued_work() -> None:
    fakes = [BatchFake(delay=0.2), BatchFake(delay=0.2)]
    batcher = Batcher(fakes, ServiceSettings(max_batch_requests=1))
    batcher.start()

    async def scenario() -> list:
        t0 = time.perf_counter()
        out = await asyncio.gather(*(batcher.submit(work(str(i))) for i in range(4)))
        return [out, time.perf_counter() - t0]

    out, elapsed = asyncio.run(scenario())
    assert len(fakes[0].calls) >= 1 and len(fakes[1].calls) >= 1
    assert elapsed < 0.75  # 4 x 0.2 s on two replicas, not one
    assert all(f.overlaps == 0 for f in fakes)

    async def after_close() -> None:
        batcher.close()
        with pytest.raises(ShuttingDown):
            await batcher.submit(work("late"))

    asyncio.run(after_close())


async def _timed(coro, t0: float) -> tuple[float, object]:
    """When ``coro`` settled (seconds after ``t0``) and what it gave or raised."""
    try:
        out: object = await coro
    except Exception as exc:  # noqa: BLE001 - the outcome is what is compared
        out = exc
    return time.perf_counter() - t0, out


def test_cost_admission_sheds_what_the_queue_would_keep_past_the_deadline() -> None:
    """After one measured call (0.2 s for 100 tokens) a burst of 12 with a 1.1 s deadline: about 5 fit; the others
    get QueueFull at once with a retry_after, and no admitted request reaches its deadline."""
    fake = BatchFake(delay=0.2)
    batcher = Batcher([fake], ServiceSettings(batching=False))
    batcher.start()

    async def scenario() -> list[tuple[float, object]]:
        await batcher.submit(work("measure"), 10)
        assert batcher.throughput.rate is not None and batcher.throughput.rate < 100 / 0.2 * 1.01
        fake.delay = 0.1  # faster than measured: the admitted ones finish well within the deadline
        t0 = time.perf_counter()
        return await asyncio.gather(*(_timed(batcher.submit(work(f"b{i}"), 1.1), t0) for i in range(12)))

    out = asyncio.run(scenario())
    batcher.close()
    shed = [(t, o) for t, o in out if isinstance(o, QueueFull)]
    served = [o for _, o in out if not isinstance(o, QueueFull)]
    assert all(not isinstance(o, Exception) for o in served), served  # no TimeoutError
    assert 3 <= len(served) <= 6 and len(served) + len(shed) == 12, out
    assert all(t < 0.1 and o.retry_after >= 1 and "request_timeout_s=1.1" in str(o) for t, o in shed)
    assert fake.calls == [1] * (1 + len(served))


def test_a_request_with_nothing_ahead_is_never_shed() -> None:
    fake = BatchFake(delay=0.05)
    batcher = Batcher([fake], ServiceSettings(batching=False))
    batcher.start()

    async def scenario() -> None:
        await batcher.submit(work("measure"), 10)
        await batcher.submit(work("bigger than the deadline", tokens=10_000), 0.5)  # runs: retrying could not help

    asyncio.run(scenario())
    batcher.close()


def test_drain_answers_every_request_by_its_deadline() -> None:
    """One replica, 0.2 s a request, 6 in flight, a 0.5 s drain: the first ones finish, those the queue cannot reach
    get ShuttingDown at once, whatever still runs at the deadline gets it then; new work is refused."""
    fake = BatchFake(delay=0.2)
    batcher = Batcher([fake], ServiceSettings(batching=False))
    batcher.start()

    async def scenario() -> tuple[list[tuple[float, object]], float]:
        await batcher.submit(work("measure"), 10)
        t0 = time.perf_counter()
        pending = [asyncio.ensure_future(_timed(batcher.submit(work(f"d{i}"), 10), t0)) for i in range(6)]
        await asyncio.sleep(0.05)
        batcher.drain(time.perf_counter() + 0.5)
        with pytest.raises(ShuttingDown):
            await batcher.submit(work("late"))
        return await asyncio.gather(*pending), time.perf_counter() - t0

    out, elapsed = asyncio.run(scenario())
    batcher.close()
    finished = [o for _, o in out if not isinstance(o, Exception)]
    refused = [(t, o) for t, o in out if isinstance(o, ShuttingDown)]
    assert len(finished) + len(refused) == 6 and finished and refused, out
    assert elapsed < 0.55 + 0.2  # every request answered by the deadline (and a loaded machine's slack)
    assert any(t < 0.2 for t, _ in refused)  # the ones the queue could not reach: at once


def test_a_call_never_outlives_the_earliest_deadline_in_it() -> None:
    """A pass that grows with the batch (0.2 s a request): four requests queued behind a held one with a 1 s
    deadline. One call over all four would end at ~1.3 s and time every one of them out; calls are cut where the
    measured rate says the earliest deadline would pass, so the first call (two requests) is answered in time."""
    fake = BatchFake(per_item=0.2)
    batcher = Batcher([fake], ServiceSettings(batching=True))
    batcher.start()

    async def scenario() -> list[object]:
        await batcher.submit(work("measure"), 10)  # 100 tokens in 0.2 s
        fake.release.clear()
        held = asyncio.ensure_future(batcher.submit(work("held"), 10))
        await asyncio.sleep(0.05)
        queued = [asyncio.ensure_future(_timed(batcher.submit(work(f"q{i}"), 1.0), 0.0)) for i in range(4)]
        await asyncio.sleep(0.25)
        fake.release.set()
        await held
        return [o for _, o in await asyncio.gather(*queued)]

    out = asyncio.run(scenario())
    batcher.close()
    served = [o for o in out if not isinstance(o, Exception)]
    assert len(served) >= 2, out
    assert max(fake.calls[2:]) <= 2, fake.calls  # no call of 3 or 4 that the deadline could not fit
