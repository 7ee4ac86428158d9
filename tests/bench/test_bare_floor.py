"""``bare`` is the floor of the work the scoring methods do (issue #33): SmolLM2 at ``--tokens 8192`` was scored in
two windows of ~4.1k tokens (the planner's upper estimate, 8196, was over the 8192 budget) while ``bare`` ran one
8.1k pass, so ``full`` came out faster than ``bare``."""

from __future__ import annotations

import pytest
import torch

BUDGET = 1000


@pytest.fixture(scope="module")
def scorer():
    from routehead.engine.scorer import HeadScorer
    from routehead.testing.random_models import random_lm

    return HeadScorer(random_lm("tiny", "cpu"), max_doc_tokens=None, max_prompt_tokens=BUDGET)


def _passes(scorer, fn) -> list[int]:
    """Lengths of the forward passes ``fn`` runs through the decoder."""
    seen: list[int] = []
    handle = scorer.base.register_forward_pre_hook(lambda _m, _a, kw: seen.append(kw["input_ids"].shape[1]),
                                                   with_kwargs=True)
    try:
        fn()
    finally:
        handle.remove()
    return seen


def test_bare_runs_the_windows_scoring_runs(scorer):
    from routehead.testing.passes import mode_method, rerank_pass
    from routehead.testing.workload import SYNTH_QUERY, sized_docs

    docs = sized_docs(scorer, 24, 60, seed=3)  # ~1.7k tokens: over the budget
    prompts = scorer.window_prompts(SYNTH_QUERY, docs)
    assert len(prompts) > 1
    S = rerank_pass(scorer, [(SYNTH_QUERY, docs)], mode_method("full", scorer.lm))[0]
    assert len(S.windows) == len(prompts) and S.prompt_tokens == max(p.length for p in prompts)
    lengths = [p.length for p in prompts]
    assert _passes(scorer, lambda: scorer.bare_forward(SYNTH_QUERY, docs)) == lengths
    assert scorer.bare_forward(SYNTH_QUERY, docs) == lengths and max(lengths) <= BUDGET


def test_bare_one_pass_within_budget(scorer):
    from routehead.testing.workload import SYNTH_QUERY, sized_docs

    docs = sized_docs(scorer, 4, 60, seed=4)
    whole = scorer.builder.prompt(SYNTH_QUERY, docs).length
    assert _passes(scorer, lambda: scorer.bare_forward(SYNTH_QUERY, docs)) == [whole]


@pytest.mark.parametrize("tokens", [450, 700, BUDGET])
def test_sized_prompt_is_one_window(scorer, tokens):
    """A prompt asked for within the budget is scored in one window, so every method runs ``tokens`` in one pass."""
    from routehead.testing.workload import docs_for_tokens

    q, docs = docs_for_tokens(scorer, tokens, None, 40)
    assert len(scorer.plan(q, docs)[2]) == 1
    n = scorer.builder.prompt(q, docs).length
    assert abs(n - tokens) <= 40 and n <= BUDGET


def test_bare_output_unchanged(scorer):
    """One window: the same single plain pass as before (the decoder's output for the whole prompt)."""
    from routehead.testing.workload import SYNTH_QUERY, sized_docs

    docs = sized_docs(scorer, 3, 40, seed=5)
    p = scorer.builder.prompt(SYNTH_QUERY, docs)
    got: list[torch.Tensor] = []
    handle = scorer.base.register_forward_hook(lambda _m, _a, out: got.append(out.last_hidden_state))
    try:
        scorer.bare_forward(SYNTH_QUERY, docs)
    finally:
        handle.remove()
    with torch.inference_mode():
        ref = scorer.base(input_ids=torch.tensor([p.prefix_ids + p.query_ids]), use_cache=False).last_hidden_state
    assert len(got) == 1 and torch.equal(got[0], ref)
