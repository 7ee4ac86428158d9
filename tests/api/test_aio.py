"""``Reranker.arerank`` / ``rank_async``: concurrent awaits share one model safely and match the sync call."""

from __future__ import annotations

import asyncio

from routehead.api import Reranker
from routehead.testing.tiny import tiny_lm
from tests.service.conftest import BatchFake, fake_rank

DOCS = ["the cat sat", "a dog ran", "cat and dog"]


def test_concurrent_awaits_never_enter_the_model_together() -> None:
    from routehead.aio import arerank

    fake = BatchFake(delay=0.01)

    async def many() -> list:
        return await asyncio.gather(*(arerank(fake, q, DOCS) for q in ["cat", "dog", "cat dog"] * 4))

    out = asyncio.run(many())
    assert fake.overlaps == 0 and len(fake.calls) == 12
    assert out[2] == fake_rank("cat dog", DOCS)


def test_reranker_async_methods_match_sync() -> None:
    rr = Reranker(model=tiny_lm("llama"), method="static", heads=[(0, 1), (2, 3)])
    expected = rr.rerank("which cat?", DOCS)

    async def both():
        return await asyncio.gather(rr.arerank("which cat?", DOCS), rr.rank_async("which cat?", DOCS, top_k=1))

    ranking, ranked = asyncio.run(both())
    assert ranking.indices == expected.indices and ranking.scores == expected.scores
    assert ranked[0]["corpus_id"] == expected.indices[0]
