"""Golden tests of ``core`` (CoRe heads, arXiv 2510.02219) and ``layers`` (Selective-ICR, arXiv 2602.22591).

The reference side is written from the papers' code (linhhtran/CoRe-Reranking ``core_detector.py`` and
``reranker_calib.py``; ielab/Selective-ICR ``in_context_reranker.py``), independently of routehead's engine: the
prompt is one string tokenized as a whole, spans come from character offsets (inclusive ends), attention comes
from ``output_attentions=True`` of an eager twin of the tiny model, the "N/A" prompt runs in full, and every
formula is a plain loop:

- CoRe's document score ``s_{l,h}(d) = sum_{j in d} mean_{i in q} A^{l,h}_{i,j}`` (no calibration, no mask);
- CoRe's head score ``mean over samples of exp(s(d+)/t) / (exp(s(d+)/t) + sum_{d-} exp(s(d-)/t))``, top-k;
- inference for both (``reranker_calib.py``, Selective-ICR's ``masked_NA_calibration``): per token, the selected
  heads' (query - "N/A") attention summed; per document ``c > mean - 2 std`` (unbiased) kept; summed.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from routehead.errors import RouteheadError
from routehead.testing.tiny import eager_twin, tiny_lm
from tests.engine.test_reference import DOCS, LATE, QUERY, SEP  # the golden tests' shared inputs

FAMILIES = ["llama", "qwen2", "mistral", "gemma3"]

CORE_HEADS = [(0, 1), (1, 3), (2, 0), (2, 2)]  # inside every tiny family's layers (mistral has 3)


# -- the literal reference ----------------------------------------------------------------------------------------
def literal_prompt(tok, query: str, docs: list[str]) -> tuple[list[int], tuple[int, int], list[tuple[int, int]]]:
    """The published prompt, its token ids, the query span and the document spans (inclusive ends)."""
    marker = "@@CONTENT@@"
    head, tail = tok.apply_chat_template([{"role": "user", "content": marker}], tokenize=False,
                                         add_generation_prompt=True).split(marker)
    contents = [f"[{i + 1}] {d}" for i, d in enumerate(docs)]
    prompt = head + " Here are some paragraphs:" + "".join(SEP + c for c in contents)
    prompt += SEP + LATE + SEP + "Query:" + f" {query}" + tail
    enc = tok(prompt, add_special_tokens=False, return_offsets_mapping=True)
    at = {j: i for i, (a, b) in enumerate(enc["offset_mapping"]) for j in range(a, b)}

    def span(text: str) -> tuple[int, int]:
        c0 = prompt.index(text)
        return at[c0], at[c0 + len(text) - 1]

    return enc["input_ids"], span(LATE + SEP + "Query:" + f" {query}" + tail), [span(c) for c in contents]


def literal_rows(model, tok, query: str, docs: list[str]) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """``mean_{i in q} A^{l,h}_{i,j}``: ``[layers, heads, tokens]`` float64, and the document spans."""
    ids, (qs, qe), spans = literal_prompt(tok, query, docs)
    with torch.no_grad():
        out = model(torch.tensor([ids]), output_attentions=True)
    return torch.stack([a[0, :, qs:qe + 1, :].mean(1) for a in out.attentions]).double(), spans


def literal_icr(model, tok, heads: list[tuple[int, int]]) -> torch.Tensor:
    """ICR's masked N/A calibration over ``heads``: sum over heads per token, then per document mask and sum."""
    q, spans = literal_rows(model, tok, QUERY, DOCS)
    na, _ = literal_rows(model, tok, "N/A", DOCS)
    scores = []
    for s, e in spans:
        c = [sum(float(q[lay, h, j] - na[lay, h, j]) for lay, h in heads) for j in range(s, e + 1)]
        mean = sum(c) / len(c)
        std = math.sqrt(sum((x - mean) ** 2 for x in c) / (len(c) - 1)) if len(c) > 1 else math.nan
        scores.append(sum(x for x in c if x > mean - 2 * std))
    return torch.tensor(scores, dtype=torch.float64)


def literal_core_score(S: np.ndarray, pos: int, negs: list[int], t: float, lay: int, h: int) -> float:
    num = math.exp(float(S[lay, h, pos]) / t)
    return num / (num + sum(math.exp(float(S[lay, h, n]) / t) for n in negs))


def assert_same_ranking(got, want) -> None:
    assert np.argsort(-np.asarray(got), kind="stable").tolist() == np.argsort(-np.asarray(want), kind="stable").tolist()


def live_scores(rr, docs=DOCS) -> np.ndarray:
    r = rr.rerank(QUERY, docs)
    out = np.empty(len(docs))
    out[r.indices] = r.scores
    return out


# -- (a) raw_sum ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_raw_sum_is_the_literal_attention_mass(family):
    from routehead.engine.scorer import HeadScorer

    lm = tiny_lm(family)
    q, spans = literal_rows(eager_twin(lm, family), lm.tokenizer, QUERY, DOCS)
    S = HeadScorer(lm, max_doc_tokens=None).score(QUERY, DOCS)
    want = torch.stack([q[..., s:e + 1].sum(-1) for s, e in spans], dim=-1)  # [L, H, docs], no N/A, no mask
    assert torch.allclose(S.raw_sum.double(), want, atol=1e-5, rtol=0), (S.raw_sum - want).abs().max()
    for lay in range(lm.num_layers):
        for h in range(lm.num_heads):
            assert_same_ranking(S.raw_sum[lay, h].numpy(), want[lay, h].numpy())


# -- (b) CoRe detection ------------------------------------------------------------------------------------------
def _toy_store(arrays: dict[str, np.ndarray], qrels: dict[str, dict[str, int]]):
    from routehead.offline.collect import ScoredCollection
    from routehead.offline.store import Entry

    entries = {q: Entry([f"d{i}" for i in range(S.shape[-1])], S, S, None, S) for q, S in arrays.items()}
    return ScoredCollection(SimpleNamespace(qrels=qrels), {}, entries, {"collection": "toy", "split": "train"})


def literal_detection(sc, t: float) -> np.ndarray:
    L, H = next(iter(sc.entries.values())).raw_sum.shape[:2]
    total, n = np.zeros((L, H)), 0
    for qid, e in sc.entries.items():
        judged = sc.collection.qrels.get(qid, {})
        rel = [i for i, d in enumerate(e.doc_ids) if judged.get(d, 0) > 0]
        negs = [i for i, d in enumerate(e.doc_ids) if judged.get(d, 0) <= 0]
        if not negs:
            continue
        for p in rel:  # one sample per (query, positive); the other positives are not in its softmax
            n += 1
            for lay in range(L):
                for h in range(H):
                    total[lay, h] += literal_core_score(e.raw_sum, p, negs, t, lay, h)
    return total / n


def test_core_detection_equals_the_literal_formula():
    from routehead.offline.store import Entry
    from routehead.training.detect import contrastive_scores, core_scores, detect_core

    rng = np.random.default_rng(0)
    arrays = {f"q{i}": rng.uniform(0, 0.2, (5, 3, 6)).astype(np.float32) for i in range(4)}
    qrels = {"q0": {"d1": 1}, "q1": {"d0": 2, "d4": 1, "d5": -1}, "q2": {},  # q2: no positive, no sample
             "q3": {f"d{i}": 1 for i in range(6)}}  # q3: no negative, no contrast
    sc = _toy_store(arrays, qrels)
    for t in (0.1, 1.0, 0.02):
        S, n = core_scores(sc, t)
        assert n == 3
        np.testing.assert_allclose(S, literal_detection(sc, t), rtol=1e-12, atol=1e-12)
        heads, S2, _ = detect_core(sc, top=4, temperature=t)
        want = sorted((-S[a, b], a, b) for a in range(5) for b in range(3))[:4]
        assert heads == [(a, b) for _, a, b in want] and np.array_equal(S, S2)
    # a tiny temperature (exp(s/t) overflows float64 beyond s/t = 709) stays exact: the literal formula with
    # numerator and denominator divided by exp(max s / t)
    big = np.array([[[1.0, 0.2, 0.9, 0.999]]])
    tiny = math.exp(-10)  # exp((0.999 - 1.0) / 1e-4)
    assert contrastive_scores(big, 3, [0, 1, 2], 1e-4)[0, 0] == pytest.approx(tiny / (1 + tiny), rel=1e-9)
    assert contrastive_scores(big, 0, [1, 2, 3], 1e-4)[0, 0] == pytest.approx(1 / (1 + tiny), rel=1e-12)
    # ties by (layer, head); pruning keeps layers < int(L * (1 - p)); max_layer keeps layers <= M
    flat = _toy_store({"q": np.zeros((4, 2, 3), np.float32)}, {"q": {"d0": 1}})
    assert detect_core(flat, top=3)[0] == [(0, 0), (0, 1), (1, 0)]
    peaked = np.zeros((4, 2, 3), np.float32)
    peaked[3, 1, 0], peaked[2, 0, 0], peaked[1, 1, 0] = 0.9, 0.5, 0.3
    sc = _toy_store({"q": peaked}, {"q": {"d0": 1}})
    assert detect_core(sc, top=2)[0] == [(3, 1), (2, 0)]
    assert detect_core(sc, top=2, prune=0.5)[0] == [(1, 1), (0, 0)]
    assert detect_core(sc, top=2, max_layer=2)[0] == [(2, 0), (1, 1)]
    with pytest.raises(RouteheadError, match="not both"):
        detect_core(sc, prune=0.5, max_layer=2)
    old = _toy_store({"q": peaked}, {"q": {"d0": 1}})
    old.entries["q"] = Entry(old.entries["q"].doc_ids, peaked, peaked)  # a store made before raw_sum
    with pytest.raises(RouteheadError, match="older routehead"):
        core_scores(old)


@pytest.fixture(scope="module")
def tiny_store(tmp_path_factory):
    """Three scifact-mini queries scored by the tiny llama in shuffled order (top 5), in a temporary store."""
    from routehead.engine.scorer import HeadScorer
    from routehead.offline.collect import score_collection
    from routehead.offline.data import load_collection

    lm = tiny_lm("llama")
    scorer = HeadScorer(lm, max_doc_tokens=40)
    sc = score_collection(load_collection("examples/scifact-mini", "test"), scorer, scorer.settings(), top_k=5,
                          max_queries=3, progress=False, doc_order="shuffle",
                          root=tmp_path_factory.mktemp("store"))
    return sc, scorer


def test_detection_on_a_stored_collection_and_its_assets(tiny_store, tmp_path, monkeypatch):
    """``routehead detect --rule core|layers`` on a tiny store: the literal CoRe scores and per-layer analysis,
    and assets that ``core`` and ``layers`` load."""
    import routehead.cli.offline as cli
    from routehead.api import Reranker
    from routehead.engine.aggregate import mask_outliers_and_sum, spans_of
    from routehead.metrics import ndcg_at_k
    from routehead.offline.views import gains
    from routehead.training.detect import core_scores, detect_window

    sc, scorer = tiny_store
    assert all(e.raw_sum is not None for e in sc.entries.values())
    S, n = core_scores(sc, 0.1)
    assert n > 0
    np.testing.assert_allclose(S, literal_detection(sc, 0.1), rtol=1e-12, atol=1e-12)
    # the per-layer analysis, literally: every head of the layers summed per token, then masked, summed
    L, H = scorer.lm.num_layers, scorer.lm.num_heads
    (s, e), per_layer, per_window = detect_window(sc, width=2)
    want_layer, want_window = np.zeros(L), np.zeros(L - 1)
    for qid, ent in sc.entries.items():
        t = ent.tokens
        index = {tuple(x): i for i, x in enumerate(t.heads.tolist())}
        rows = torch.from_numpy(t.decoded([index[(lay, h)] for lay in range(L) for h in range(H)])).view(L, H, -1)
        g, ideal = gains(sc, qid, ent.doc_ids)
        spans = spans_of(t.counts)
        for lay in range(L):
            want_layer[lay] += ndcg_at_k(mask_outliers_and_sum(rows[lay].sum(0)[None], spans)[0].double().numpy(),
                                         g, ideal)[()] / len(sc.entries)
        for a in range(L - 1):
            x = rows[a:a + 2].reshape(2 * H, -1).sum(0)[None]
            want_window[a] += ndcg_at_k(mask_outliers_and_sum(x, spans)[0].double().numpy(), g, ideal)[()] / len(
                sc.entries)
    np.testing.assert_allclose(per_layer, want_layer, atol=1e-12)
    np.testing.assert_allclose(per_window, want_window, atol=1e-12)
    assert e - s == 1 and s == int(np.flatnonzero(want_window == want_window.max())[0])
    # the CLI writes the assets; the methods load them (identity checked, prompt settings carried)
    monkeypatch.setattr(cli, "job_from", lambda args: SimpleNamespace(run=lambda: (sc, scorer)))
    base = dict(data="x", top=None, temperature=None, prune=None, max_layer=None, width=None)
    cli.detect(argparse.Namespace(**base, rule="core", out=str(tmp_path / "core.json")))
    cli.detect(argparse.Namespace(**{**base, "width": 2}, rule="layers", out=str(tmp_path / "layers.json")))
    body = json.loads((tmp_path / "core.json").read_text())
    assert body["detection"]["temperature"] == 0.1 and body["doc_order"] == "shuffle" and len(body["heads"]) == 8
    rr = Reranker(scorer.lm, method="core", heads=tmp_path / "core.json")
    assert rr.heads == [tuple(h) for h in body["heads"]] and rr.info()["detection"]["rule"] == "core"
    rr = Reranker(scorer.lm, method="layers", heads=str(tmp_path / "layers.json"))
    assert rr.info()["window"] == [s, e] and rr.info()["detection"]["width"] == 2
    with pytest.raises(RouteheadError, match="not used by --rule layers"):
        cli.detect(argparse.Namespace(**{**base, "temperature": 0.1}, rule="layers", out="x.json"))


# -- (c) core and (d) layers at inference --------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_core_method_equals_literal_icr_over_its_heads(family):
    from routehead.api import Reranker

    lm = tiny_lm(family)
    rr = Reranker(lm, method="core", heads=CORE_HEADS, doc_order="input")
    got = live_scores(rr)
    want = literal_icr(eager_twin(lm, family), lm.tokenizer, CORE_HEADS).numpy()
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    assert_same_ranking(got, want)
    assert rr.info()["heads"] == [list(h) for h in CORE_HEADS]


@pytest.mark.parametrize("family", FAMILIES)
def test_layers_method_equals_literal_icr_over_its_window_and_stops_after_it(family):
    from routehead.api import Reranker
    from routehead.engine.layers import decoder_layers

    lm = tiny_lm(family)
    s, e = 1, lm.num_layers - 2
    rr = Reranker(lm, method="layers", heads=(s, e), doc_order="input")
    calls = [0] * lm.num_layers
    hooks = [layer.register_forward_pre_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
             for i, layer in enumerate(decoder_layers(lm.model))]
    try:
        got = live_scores(rr)
    finally:
        for hk in hooks:
            hk.remove()
    assert all(c > 0 for c in calls[:e + 1]) and not any(calls[e + 1:]), calls  # the pass exits after layer e
    window = [(lay, h) for lay in range(s, e + 1) for h in range(lm.num_heads)]
    want = literal_icr(eager_twin(lm, family), lm.tokenizer, window).numpy()
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
    assert_same_ranking(got, want)
    assert rr.info()["window"] == [s, e]


def test_assets_refused_and_missing(tmp_path: Path):
    from routehead.selection import load_method
    from routehead.selection.layers import load_window, save_window

    llama, qwen = tiny_lm("llama").identity(), tiny_lm("qwen2").identity()
    qwen = {**qwen, "num_layers": 5}
    for name, rule in (("core", "core"), ("layers", "layers")):
        with pytest.raises(RouteheadError, match=f"routehead detect --rule {rule}"):
            load_method(name, llama)
    save_window(tmp_path / "w.json", (1, 2), llama, detection={"rule": "layers"})
    assert load_window(tmp_path / "w.json", llama)[0] == (1, 2)
    with pytest.raises(RouteheadError, match="another model"):
        load_window(tmp_path / "w.json", qwen)
    with pytest.raises(RouteheadError, match="takes a window"):
        load_method("layers", llama, heads=[(0, 1), (2, 3), (3, 0)])
    with pytest.raises(RouteheadError, match="0 <= start <= end < 4"):
        load_method("layers", llama, heads=(2, 4))
    assert load_method("layers", llama, heads="1, 2").window == (1, 2)  # the CLI's --heads 1,2
    m = load_method("layers", llama, heads=(2, 3))
    assert m.select().deepest_layer == 3 and len(m.select().heads.heads) == 2 * llama["num_heads"]


@pytest.mark.parametrize(("model", "layers", "pruned"), [("smollm2-135m", 30, 0.25), ("gemma3-270m", 18, 0.25)])
def test_shipped_assets_load_as_their_methods(model, layers, pruned):
    """The CoRe head set and the layer window shipped for each embedded model load through the registry with that
    model's identity, and say how they were chosen (on scifact train only)."""
    import json

    from routehead.assets import default_core_heads_path, default_window_path
    from routehead.selection import load_method

    core = json.loads(default_core_heads_path(model).read_text())
    window = json.loads(default_window_path(model).read_text())
    identity = core["model"]
    assert window["model"] == identity and identity["num_layers"] == layers
    assert core["detected_on"] == window["detected_on"] == "scifact/train"
    assert core["detection"]["prune"] == pruned and "chosen" in core["detection"] and "chosen" in window["detection"]
    sel = load_method("core", identity).select(None)
    assert len(sel.heads.heads) == 8 and sel.deepest_layer < layers * (1 - pruned)  # CoRe's pruning
    sel = load_method("layers", identity).select(None)
    s, e = window["window"]
    assert {a for a, _ in sel.heads.heads} == set(range(s, e + 1)) and sel.deepest_layer == e
