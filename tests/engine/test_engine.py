"""The attention-scoring engine against eager attention, on tiny random models of three architectures."""

from __future__ import annotations

import pytest
import torch

from routehead.engine import capture
from routehead.engine.aggregate import mask_outliers_and_sum
from routehead.engine.prompt import plan_windows
from routehead.engine.scorer import HeadScorer
from routehead.errors import RouteheadError
from routehead.testing.tiny import eager_twin, tiny_lm

FAMILIES = ["llama", "qwen2", "gemma3", "mistral"]
QUERY = "which enzyme breaks down starch?"
DOCS = [
    "Amylase is an enzyme that catalyses the hydrolysis of starch into sugars.",
    "The Eiffel Tower is a wrought-iron lattice tower in Paris.",
    "Lipase breaks down fats; protease breaks down proteins.",
    "Starch is a polymeric carbohydrate made of glucose units.",
]


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    return request.param


@pytest.fixture(scope="module")
def setup(family):
    lm = tiny_lm(family)
    scorer = HeadScorer(lm, max_doc_tokens=None)
    ref = eager_twin(lm, family)
    return family, lm, scorer, ref


def all_heads(lm):
    return [(lay, h) for lay in range(lm.num_layers) for h in range(lm.num_heads)]


def eager_rows(ref, prompt, suffix):
    """Reference: one full eager pass, output_attentions=True, query-span rows averaged over query tokens."""
    ids = prompt.prefix_ids + suffix
    with torch.no_grad():
        out = ref(input_ids=torch.tensor([ids]), output_attentions=True)
    P = prompt.prefix_len
    return torch.cat([a[0, :, P:, :P].mean(1) for a in out.attentions])  # [L*H, P]


def test_outputs_unchanged_by_capture(setup):
    family, lm, scorer, _ = setup
    ids = torch.tensor([scorer.builder.prompt(QUERY, DOCS).full_ids()])
    from routehead.testing.tiny import tiny_model

    plain = tiny_model(family)  # same seed, same weights, plain SDPA
    with torch.no_grad():
        expected = plain(input_ids=ids).logits
        rec = capture.Recorder({0: [0, 1]}, (ids.shape[1] - 3, ids.shape[1]))
        with capture.recording(rec):
            got = lm.model(input_ids=ids).logits
    assert rec.rows, "the recorder saw no attention call"
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("single_pass", [True, False])
def test_rows_equal_eager_attention(setup, single_pass):
    _, lm, scorer, ref = setup
    b = scorer.builder
    prompt = b.prompt(QUERY, DOCS)
    assert prompt.prefix_len > 64, "prompt must be longer than the sliding window to test its mask"
    q_rows, na_rows = scorer.query_rows(prompt, all_heads(lm), single_pass=single_pass)
    torch.testing.assert_close(q_rows, eager_rows(ref, prompt, prompt.query_ids), atol=1e-5, rtol=0)
    torch.testing.assert_close(na_rows, eager_rows(ref, prompt, prompt.na_ids), atol=1e-5, rtol=0)


@pytest.mark.parametrize("rows", [1, 3])
def test_single_pass_gives_each_suffix_its_own_full_pass(setup, rows):
    """The two-branch pass: hidden states of query and "N/A" equal those of prefix+query and prefix+"N/A" alone,
    also for prompts of different lengths sharing one pass as right-padded batch rows."""
    _, lm, scorer, _ = setup
    assert scorer.single_pass
    b = scorer.builder
    cases = [(QUERY, DOCS), ("starch?", DOCS[2:5]), (QUERY + " Which one, and why?", DOCS[:1])][:rows]
    prompts = [b.prompt(q, d) for q, d in cases]
    split = capture.Split(tuple(p.prefix_len for p in prompts),
                          tuple(p.prefix_len + len(p.query_ids) for p in prompts))
    W, na = split.width, prompts[0].na_ids
    last = lm.num_layers - 1
    both = scorer._forward([p.prefix_ids + p.query_ids + [0] * (W - m) + na for p, m in zip(prompts, split.main)],
                           last, keep_output=True, split=split,
                           positions=[list(range(W)) + list(range(p.prefix_len, p.prefix_len + len(na)))
                                      for p in prompts])
    for row, p in enumerate(prompts):
        M = p.prefix_len + len(p.query_ids)
        with_q = scorer._forward([p.prefix_ids + p.query_ids], last, keep_output=True)
        with_na = scorer._forward([p.prefix_ids + na], last, keep_output=True)
        torch.testing.assert_close(both[row, :M], with_q[0], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(both[row, W:], with_na[0, p.prefix_len:], atol=1e-4, rtol=1e-4)


def test_batched_scores_equal_one_at_a_time(setup):
    """score_many with several prompts per pass (different lengths, windows, head subsets) == score per query."""
    _, lm, scorer, _ = setup
    items = [(QUERY, DOCS), ("starch?", DOCS[2:5]), (QUERY + " Which one, and why?", DOCS[:1]), ("fats", DOCS[::-1])]
    for heads in (None, [(0, 1), (lm.num_layers - 1, 0), (1, lm.num_heads - 1)]):
        alone = [scorer.score(q, d, heads=heads) for q, d in items]
        for batched, one in zip(scorer.score_many(items, heads=heads, batch_size=3), alone):
            assert torch.equal(batched.computed, one.computed)
            assert batched.prompt_tokens == one.prompt_tokens
            torch.testing.assert_close(batched.calibrated, one.calibrated, atol=2e-6, rtol=1e-4, equal_nan=True)
            torch.testing.assert_close(batched.raw, one.raw, atol=2e-6, rtol=1e-4, equal_nan=True)
    windowed = HeadScorer(lm, max_doc_tokens=None, max_prompt_tokens=320)  # long lists split into windows
    for batched, one in zip(windowed.score_many(items, batch_size=4), [windowed.score(q, d) for q, d in items]):
        assert batched.windows == one.windows
        torch.testing.assert_close(batched.calibrated, one.calibrated, atol=2e-6, rtol=1e-4)
    assert any(len(windowed.score(q, d).windows) > 1 for q, d in items)
    with pytest.raises(ValueError, match="batch_size"):
        scorer.score_many(items, batch_size=0)


def test_calibrated_score_equals_two_full_passes(setup):
    _, lm, scorer, ref = setup
    S = scorer.score(QUERY, DOCS)
    b = scorer.builder
    prompt = b.prompt(QUERY, DOCS)
    q, na = eager_rows(ref, prompt, prompt.query_ids), eager_rows(ref, prompt, prompt.na_ids)
    L, H = lm.num_layers, lm.num_heads
    expected = mask_outliers_and_sum(q - na, prompt.doc_spans).reshape(L, H, -1)
    expected_raw = mask_outliers_and_sum(q, prompt.doc_spans).reshape(L, H, -1)
    torch.testing.assert_close(S.calibrated, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(S.raw, expected_raw, atol=1e-5, rtol=0)
    assert S.computed.all()


def test_head_subset_is_slice_and_exits_early(setup):
    _, lm, scorer, _ = setup
    full = scorer.score(QUERY, DOCS)
    subset = [(0, 1), (1, 3), (1, 0)]
    calls = [0] * lm.num_layers
    mlps = [0] * lm.num_layers
    hooks = [layer.register_forward_pre_hook(lambda m, a, i=i: calls.__setitem__(i, calls[i] + 1))
             for i, layer in enumerate(scorer.layers)]
    hooks += [layer.mlp.register_forward_pre_hook(lambda m, a, i=i: mlps.__setitem__(i, mlps[i] + 1))
              for i, layer in enumerate(scorer.layers)]
    try:
        part = scorer.score(QUERY, DOCS, heads=subset)
    finally:
        for h in hooks:
            h.remove()
    assert calls[:2] == [1, 1]  # one pass: prefix, query and "N/A" together
    assert sum(calls[2:]) == 0, f"layers after the deepest selected one ran: {calls}"
    assert mlps[:2] == [1, 0], f"the deepest layer's output is not needed, its MLP must not run: {mlps}"
    for lay, h in subset:
        torch.testing.assert_close(part.calibrated[lay, h], full.calibrated[lay, h], atol=1e-6, rtol=0)
    mask = part.computed
    assert int(mask.sum()) == 3 and torch.isnan(part.calibrated[~mask]).all()


def test_spans_decode_to_documents(setup):
    _, lm, scorer, _ = setup
    b = scorer.builder
    prompt = b.prompt(QUERY, DOCS)
    for i, ((s, e), doc) in enumerate(zip(prompt.doc_spans, DOCS)):
        assert lm.tokenizer.decode(prompt.prefix_ids[s:e]).strip() == f"[{i + 1}] {doc}"  # the marker belongs
    q, na = lm.tokenizer.decode(prompt.query_ids), lm.tokenizer.decode(prompt.na_ids)
    assert q.startswith("Please find information") and f"Query: {QUERY}<|end|>" in q  # late instruction..tail
    assert na == q.replace(QUERY, "N/A")


def test_windows_keep_order_within_window(setup):
    """Scores of a window equal that window scored alone, times len(window)/n: a positive factor keeps order."""
    _, lm, _, _ = setup
    scorer = HeadScorer(lm, max_doc_tokens=None, max_prompt_tokens=320)
    S = scorer.score(QUERY, DOCS)
    assert len(S.windows) > 1 and sorted(i for w in S.windows for i in w) == list(range(len(DOCS)))
    for win in S.windows:
        alone = scorer.score(QUERY, [DOCS[i] for i in win])
        factor = len(win) / len(DOCS)
        torch.testing.assert_close(S.calibrated[:, :, win], alone.calibrated * factor, atol=1e-6, rtol=0)
        order = torch.argsort(alone.calibrated.sum((0, 1)))
        assert torch.equal(torch.argsort(S.calibrated[:, :, win].sum((0, 1))), order)


def test_deterministic(setup):
    _, _, scorer, _ = setup
    a, b = scorer.score(QUERY, DOCS), scorer.score(QUERY, DOCS)
    assert torch.equal(a.calibrated, b.calibrated)


def test_mask_outliers_hand_computed():
    # nine 1s and a -5: mean 0.4, unbiased std sqrt(32.4 / 9) = 1.897, threshold 0.4 - 3.795 = -3.395:
    # the -5 is masked, sum 9
    x = torch.tensor([[1.0] * 9 + [-5.0, 4.0]])
    assert torch.allclose(mask_outliers_and_sum(x, [(0, 10)]), torch.tensor([[9.0]]))
    # two documents at once; a one-token document scores 0 (its std is undefined: nothing passes the '>')
    assert torch.allclose(mask_outliers_and_sum(x, [(10, 11), (0, 10)]), torch.tensor([[0.0, 9.0]]))


def test_plan_windows_balanced_and_errors():
    assert plan_windows([10] * 4, 2, 10, 1000) == [[0, 1, 2, 3]]
    assert plan_windows([10] * 5, 2, 10, 40) == [[0, 1], [2], [3, 4]]
    with pytest.raises(RouteheadError, match="document 1 needs"):
        plan_windows([10, 500], 2, 10, 100)


def test_bad_input_is_clear(setup):
    _, _, scorer, _ = setup
    with pytest.raises(RouteheadError, match="query is empty"):
        scorer.score("  ", DOCS)
    with pytest.raises(RouteheadError, match="no documents"):
        scorer.score(QUERY, [])
    with pytest.raises(RouteheadError, match="not a string"):
        scorer.score(QUERY, ["ok", 3])
    with pytest.raises(ValueError, match="outside this model"):
        scorer.score(QUERY, DOCS, heads=[(99, 0)])


def test_unknown_mask_kind_falls_back_to_separate_passes():
    """A model whose masks the single pass does not know (chunked attention) is scored with two full passes."""
    lm = tiny_lm("llama")
    lm.model.config.attention_chunk_size = 8
    scorer = HeadScorer(lm, max_doc_tokens=None)
    assert not scorer.single_pass
    ref = eager_twin(lm, "llama")
    b = scorer.builder
    prompt = b.prompt(QUERY, DOCS)
    q, na = eager_rows(ref, prompt, prompt.query_ids), eager_rows(ref, prompt, prompt.na_ids)
    expected = mask_outliers_and_sum(q - na, prompt.doc_spans).reshape(lm.num_layers, lm.num_heads, -1)
    torch.testing.assert_close(scorer.score(QUERY, DOCS).calibrated, expected, atol=1e-5, rtol=0)


def test_take_by_slices_equals_list_indexing():
    rows = torch.arange(2 * 7 * 3.0).reshape(2, 7, 3)
    for idx in ([0, 1, 2, 3, 4, 5, 6], [3], [0, 2, 3, 6], [6, 5, 1, 2]):
        assert torch.equal(capture.take(rows, idx), rows[:, idx])


@pytest.mark.parametrize("family", ["gemma3", "mistral"])
def test_sliding_layers_block_by_block_equal_one_sdpa_call(family, monkeypatch):
    """A sliding-window layer's SDPA run block by block (``capture._windowed``) gives the plain model's logits
    and hidden states, in the plain pass (the model's own mask, sliced) and in the two-suffix pass (the band)."""
    from routehead.testing.tiny import tiny_model

    monkeypatch.setattr(capture, "WINDOW_BLOCK", 8)  # blocks of 8 rows under a 16-key window: many blocks
    calls = []
    real = capture._windowed
    monkeypatch.setattr(capture, "_windowed", lambda *a, **k: calls.append(1) or real(*a, **k))
    lm = tiny_lm(family)
    scorer = HeadScorer(lm, max_doc_tokens=None)
    prompt = scorer.builder.prompt(QUERY, DOCS)
    ids = torch.tensor([prompt.full_ids()])
    plain = tiny_model(family)
    with torch.no_grad():
        expected = plain(input_ids=ids, output_hidden_states=True)
        got = lm.model(input_ids=ids, output_hidden_states=True)
    assert calls, "no layer went through the blocked path"
    torch.testing.assert_close(got.logits, expected.logits, atol=1e-5, rtol=1e-5)
    calls.clear()
    P, na = prompt.prefix_len, prompt.na_ids
    split = capture.Split((P,), (P + len(prompt.query_ids),))
    W, last = split.width, lm.num_layers - 2  # not the final layer: hidden_states[-1] is after the final norm
    both = scorer._forward([prompt.prefix_ids + prompt.query_ids + na], last, keep_output=True, split=split,
                           positions=[list(range(W)) + list(range(P, P + len(na)))])
    assert calls, "the two-suffix pass did not use the blocked path"
    with torch.no_grad():
        alone = plain(input_ids=torch.tensor([prompt.prefix_ids + prompt.query_ids]), output_hidden_states=True)
    torch.testing.assert_close(both[0, :W], alone.hidden_states[last + 1][0], atol=1e-4, rtol=1e-4)


def test_blocking_off_gives_the_same_pass(monkeypatch):
    """ROUTEHEAD_WINDOW_BLOCK=0 (one masked SDPA call, for comparisons) and blocks give the same scores."""
    lm = tiny_lm("gemma3")
    scorer = HeadScorer(lm, max_doc_tokens=None)
    got = []
    for block in (8, 0):
        monkeypatch.setattr(capture, "WINDOW_BLOCK", block)
        got.append(scorer.score(QUERY, DOCS).calibrated)
    torch.testing.assert_close(got[0], got[1], atol=1e-6, rtol=1e-5, equal_nan=True)


@pytest.mark.parametrize("pooling", ["prompt-mean", "prompt-last"])
def test_query_embedding_in_the_prompt_equals_the_eager_hidden_states(setup, pooling):
    """A router input read off the re-ranking prompt: layer 1's output (the eager model's hidden_states[2]) over
    the query suffix that follows the documents, pooled; the same call without documents is refused."""
    _, lm, scorer, ref = setup
    prompt = scorer.builder.prompt(QUERY, DOCS)
    with torch.no_grad():
        hidden = ref(input_ids=torch.tensor([prompt.full_ids()]), output_hidden_states=True).hidden_states[2]
    suffix = hidden[0, prompt.prefix_len:].float()
    want = suffix.mean(0) if pooling == "prompt-mean" else suffix[-1]
    got = scorer.query_embedding(QUERY, 1, pooling, documents=DOCS)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # the query alone is a different input: the documents in front change it
    assert not torch.allclose(got, scorer.query_embedding(QUERY, 1, pooling.split("-")[1]), atol=1e-3)
    with pytest.raises(ValueError, match="pass its documents"):
        scorer.query_embedding(QUERY, 1, pooling)
