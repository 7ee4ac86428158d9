"""Stopping a pass nobody waits for (``layers.stop_when``): the check before each decoder layer, on a tiny Llama."""

from __future__ import annotations

import threading

import pytest
import torch

from routehead.engine.layers import stop_when
from routehead.engine.scorer import HeadScorer
from routehead.errors import PassCancelled
from routehead.testing.tiny import tiny_lm

QUERY = "which enzyme breaks down starch?"
DOCS = ["Amylase hydrolyses starch into sugars.", "The Eiffel Tower is in Paris.", "Lipase breaks down fats."]


@pytest.fixture(scope="module")
def scorer() -> HeadScorer:
    return HeadScorer(tiny_lm("llama"), max_doc_tokens=None)


def _same(a, b) -> None:
    for name in ("calibrated", "raw", "raw_sum", "sets"):
        torch.testing.assert_close(getattr(a, name), getattr(b, name), rtol=0, atol=0, equal_nan=True)


def _no_hooks_left(scorer: HeadScorer) -> bool:
    return all(not layer._forward_pre_hooks for layer in scorer.layers)


@pytest.mark.parametrize("after", [0, 1, 2])
def test_a_pass_stops_at_the_next_layer_boundary(scorer: HeadScorer, after: int) -> None:
    """``should_stop`` turns True before layer ``after``: layers before it ran whole, no later one started."""
    asked: list[int] = []
    started: list[int] = []
    finished: list[int] = []

    def should_stop() -> bool:
        asked.append(len(asked))
        return len(asked) > after

    handles = [h for i, layer in enumerate(scorer.layers) for h in (
        layer.register_forward_pre_hook(lambda _m, _a, i=i: started.append(i)),  # runs before the check
        layer.register_forward_hook(lambda _m, _a, _o, i=i: finished.append(i)))]
    try:
        with pytest.raises(PassCancelled), stop_when(scorer.layers, should_stop):
            scorer.score(QUERY, DOCS)
    finally:
        for h in handles:
            h.remove()
    assert finished == list(range(after))
    assert started == list(range(after + 1))  # layer ``after`` was entered only to be refused
    assert len(asked) == after + 1
    assert _no_hooks_left(scorer)


def test_a_pass_not_stopped_gives_identical_scores(scorer: HeadScorer) -> None:
    plain = scorer.score(QUERY, DOCS)
    asked = [0]

    def never() -> bool:
        asked[0] += 1
        return False

    with stop_when(scorer.layers, never):
        checked = scorer.score(QUERY, DOCS)
    _same(plain, checked)
    assert asked[0] == scorer.lm.num_layers  # one check per layer run (the last stops inside its attention)
    with pytest.raises(PassCancelled), stop_when(scorer.layers, lambda: True):
        scorer.score(QUERY, DOCS)
    _same(plain, scorer.score(QUERY, DOCS))  # a stopped pass leaves nothing behind
    assert _no_hooks_left(scorer)


def test_none_adds_nothing_and_other_threads_are_not_stopped(scorer: HeadScorer) -> None:
    with stop_when(scorer.layers, None):
        assert _no_hooks_left(scorer)
    plain = scorer.score(QUERY, DOCS)
    got: list = []
    with stop_when(scorer.layers, lambda: True):  # this thread's pass would stop; another thread's does not
        t = threading.Thread(target=lambda: got.append(scorer.score(QUERY, DOCS)))
        t.start()
        t.join(30)
    assert len(got) == 1
    _same(plain, got[0])
