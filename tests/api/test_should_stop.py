"""``Reranker.rerank(..., should_stop=)``: every pass of the call is stoppable, and unchanged when not stopped."""

from __future__ import annotations

import pytest

from routehead.errors import PassCancelled
from tests.toys import DOCS

QUERY = "which enzyme digests starch?"


def test_should_stop_covers_the_router_pass_and_changes_nothing_when_false(tiny_router_reranker) -> None:
    rr = tiny_router_reranker
    plain = rr.rerank(QUERY, DOCS)
    asked = [0]

    def never() -> bool:
        asked[0] += 1
        return False

    same = rr.rerank(QUERY, DOCS, should_stop=never)
    assert (same.indices, same.scores, same.heads) == (plain.indices, plain.scores, plain.heads)
    assert asked[0] > 2  # the router's embedding pass (to layer 1) and the scoring pass are both checked
    many = rr.rerank_many([(QUERY, DOCS), (QUERY, DOCS[:2])], should_stop=never)
    assert many[0].scores == plain.scores
    for after in (0, 2):  # stopped in the router's pass, then in the scoring pass
        calls = iter(range(10**6))
        with pytest.raises(PassCancelled):
            rr.rerank(QUERY, DOCS, should_stop=lambda calls=calls, after=after: next(calls) >= after)
    again = rr.rerank(QUERY, DOCS)
    assert (again.indices, again.scores) == (plain.indices, plain.scores)
