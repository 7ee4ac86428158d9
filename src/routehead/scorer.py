"""The per-head relevance tensor ``S[layer, head, doc]`` from one forward pass over the prompt.

Flow: one forward pass over ``prefix + query + "N/A"`` (prefix = instruction + documents), in which "N/A"
sees only the prefix and itself, at the positions right after the prefix (:class:`capture.Split`): both
suffixes come out of one pass with no KV cache, so time and memory are those of one plain pass over the
prompt. For each requested head, the attention the query tokens pay to each prefix token is recorded; the
calibrated token score is ``attn(query) - attn("N/A")``; per head and document, tokens scoring below
``mean - 2 std`` (over that document's tokens) are masked out and the rest summed. ICR, static heads, routing,
label search and the oracle are all selections over this one tensor.

Long lists: when the prompt would exceed the model's context (or ``max_prompt_tokens``), the documents are
split into near-equal contiguous windows scored separately. A calibrated score is a share of attention mass
spread over the window's documents, so each window's scores are multiplied by ``len(window) / n_docs``:
a positive per-window factor, so order within a window is kept, and equal documents in windows of different
size get comparable scores.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from routehead import capture
from routehead.model import LoadedModel
from routehead.prompt import Prompt, PromptBuilder, plan_windows

Head = tuple[int, int]


@dataclass
class HeadScores:
    """Scores of every document under every computed head; NaN where a head was not computed."""

    calibrated: torch.Tensor  # [layers, heads, docs], float32, CPU
    raw: torch.Tensor  # uncalibrated (query attention only), same layout
    computed: torch.Tensor  # [layers, heads] bool
    windows: list[list[int]] = field(default_factory=list)
    prompt_tokens: int = 0  # tokens run for the longest window (prefix + query)
    truncated: list[bool] = field(default_factory=list)

    @property
    def num_docs(self) -> int:
        return int(self.calibrated.shape[-1])


def mask_outliers_and_sum(token_scores: torch.Tensor, spans: Sequence[tuple[int, int]], n_std: float = 2.0
                          ) -> torch.Tensor:
    """``[n, T]`` token scores -> ``[n, docs]``: per row and document, drop tokens below mean - n_std * std.

    Population std over the document's tokens (a one-token document keeps its token).
    """
    dev = token_scores.device
    lengths = torch.tensor([e - s for s, e in spans], device=dev)
    starts = torch.tensor([s for s, _ in spans], device=dev)
    width = max(max((e - s for s, e in spans), default=0), 1)  # from the spans: no device sync
    offs = torch.arange(width, device=dev)
    valid = offs[None, :] < lengths[:, None]  # [D, W]
    idx = torch.where(valid, starts[:, None] + offs[None, :], torch.zeros_like(offs)[None, :])
    x = token_scores[:, idx]  # [n, D, W]
    v = valid.to(x.dtype)
    cnt = v.sum(-1).clamp(min=1)
    mean = (x * v).sum(-1) / cnt
    std = ((((x - mean[..., None]) * v) ** 2).sum(-1) / cnt).sqrt()
    keep = valid & (x >= (mean - n_std * std)[..., None])
    return (x * keep).sum(-1)


def normalize_heads(heads: Iterable[Head] | None, num_layers: int, num_heads: int) -> list[Head]:
    """Validated, sorted, de-duplicated ``(layer, head)`` pairs; None means all heads."""
    if heads is None:
        return [(lay, h) for lay in range(num_layers) for h in range(num_heads)]
    out = sorted({(int(lay), int(h)) for lay, h in heads})
    if not out:
        raise ValueError("empty head selection")
    for lay, h in out:
        if not (0 <= lay < num_layers and 0 <= h < num_heads):
            raise ValueError(f"head ({lay}, {h}) is outside this model's {num_layers} layers x {num_heads} heads")
    return out


def _by_layer(heads: list[Head]) -> dict[int, list[int]]:
    """``{layer: [head, ...]}`` for heads sorted by (layer, head), the order rows are returned in."""
    if list(heads) != sorted(heads):
        raise ValueError("heads must be sorted by (layer, head)")
    by_layer: dict[int, list[int]] = {}
    for lay, h in heads:
        by_layer.setdefault(lay, []).append(h)
    return by_layer


class HeadScorer:
    """Scores documents for a query with every (or some) attention heads of a frozen causal LM."""

    def __init__(self, lm: LoadedModel, max_doc_tokens: int | None = 300, max_prompt_tokens: int | None = None,
                 use_chat_template: bool = True) -> None:
        self.lm = lm
        self.builder = PromptBuilder(lm.tokenizer, max_doc_tokens=max_doc_tokens,
                                     use_chat_template=use_chat_template)
        self.budget = min(lm.max_context, max_prompt_tokens or lm.max_context)
        capture.install(lm.model)
        self.base = lm.model.get_decoder() if hasattr(lm.model, "get_decoder") else lm.model
        self.layers = capture.decoder_layers(lm.model)
        self.single_pass = capture.split_supported(lm.model.config)

    def settings(self) -> dict[str, Any]:
        """Everything that changes S, for stores and checkpoints."""
        from routehead.prompt import PROMPT_VERSION

        return {**self.lm.identity(), "dtype": str(self.lm.dtype).replace("torch.", ""),
                "max_doc_tokens": self.builder.max_doc_tokens, "max_query_tokens": self.builder.max_query_tokens,
                "budget": self.budget, "prompt": PROMPT_VERSION,
                "chat_template": bool(self.builder.head_ids and self.builder.tail_ids)}

    # -- forward passes ---------------------------------------------------------------------------------------
    def _forward(self, ids: list[int], last_layer: int, recorder: capture.Recorder | None = None,
                 keep_output: bool = False, split: capture.Split | None = None,
                 positions: list[int] | None = None) -> torch.Tensor | None:
        input_ids = torch.tensor([ids], device=self.lm.device)
        kw = {} if positions is None else {"position_ids": torch.tensor([positions], device=self.lm.device)}
        with capture.recording(recorder), capture.splitting(split), \
                capture.exit_after(self.layers, last_layer, keep_output) as box:
            self.base(input_ids=input_ids, use_cache=False, **kw)
        return box.get("hidden")

    def _single_pass(self, prompt: Prompt, by_layer: dict[int, list[int]],
                     on_layer: Callable[[int, torch.Tensor, torch.Tensor], None]) -> None:
        """One pass over prefix + query + "N/A"; ``on_layer(layer, q_rows, na_rows)`` gets ``[heads, prefix]``."""
        P, nq, nna = prompt.prefix_len, len(prompt.query_ids), len(prompt.na_ids)
        split = capture.Split(P, P + nq, by_layer, lambda lay, q, na: on_layer(lay, q[0, :, :P], na[0, :, :P]))
        self._forward(prompt.prefix_ids + prompt.query_ids + prompt.na_ids, max(by_layer), split=split,
                      positions=list(range(P + nq)) + list(range(P, P + nna)))

    @torch.inference_mode()
    def query_rows(self, prompt: Prompt, heads: list[Head], single_pass: bool | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """Attention rows ``[len(heads), prefix_len]`` of the real query and of "N/A", mean over query tokens.

        ``single_pass`` (default where the model's masks allow it) runs both suffixes in one pass; otherwise each
        suffix runs with the whole prefix again (the reference the single pass is tested against).
        """
        by_layer = _by_layer(heads)
        P = prompt.prefix_len
        rows: dict[int, tuple[torch.Tensor, ...]] = {}
        if self.single_pass if single_pass is None else single_pass:
            self._single_pass(prompt, by_layer, lambda lay, q, na: rows.__setitem__(lay, (q, na)))
        else:
            recs = []
            for suffix in (prompt.query_ids, prompt.na_ids):
                recs.append(capture.Recorder(by_layer, (P, P + len(suffix))))
                self._forward(prompt.prefix_ids + suffix, max(by_layer), recs[-1])
            rows = {lay: tuple(r.rows[lay][0, :, :P] for r in recs) for lay in by_layer}
        return tuple(torch.cat([rows[lay][i] for lay in sorted(by_layer)]).float().cpu() for i in (0, 1))

    @torch.inference_mode()
    def _score_prompt(self, prompt: Prompt, heads: list[Head]) -> tuple[torch.Tensor, torch.Tensor]:
        """Calibrated and raw scores ``[len(heads), docs]`` for one prompt.

        In a single pass each layer's rows become document scores as soon as the layer has run, so the pass
        keeps ``heads x docs``, never ``heads x prompt tokens`` for all layers at once.
        """
        spans = prompt.doc_spans

        def reduce(q_rows: torch.Tensor, na_rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return mask_outliers_and_sum(q_rows - na_rows, spans), mask_outliers_and_sum(q_rows, spans)

        if not self.single_pass:
            return reduce(*self.query_rows(prompt, heads))
        by_layer = _by_layer(heads)
        done: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._single_pass(prompt, by_layer, lambda lay, q, na: done.__setitem__(lay, reduce(q, na)))
        return tuple(torch.cat([done[lay][i] for lay in sorted(by_layer)]).float().cpu() for i in (0, 1))

    # -- public -------------------------------------------------------------------------------------------------
    def score(self, query: str, documents: Sequence[str], heads: Iterable[Head] | None = None) -> HeadScores:
        """``S[layer, head, doc]`` for ``documents`` in input order; only ``heads`` are computed (None: all)."""
        L, H = self.lm.num_layers, self.lm.num_heads
        sel = normalize_heads(heads, L, H)
        q_ids = self.builder.encode_query(query)
        d_ids, truncated = self.builder.encode_documents(documents)
        n = len(d_ids)
        fixed = self.builder.fixed_tokens(0, len(q_ids))
        per_doc = self.builder.fixed_tokens(1, 0) - self.builder.fixed_tokens(0, 0)
        windows = plan_windows([len(x) for x in d_ids], per_doc, fixed, self.budget)
        cal = torch.full((L, H, n), float("nan"))
        raw = torch.full((L, H, n), float("nan"))
        li = torch.tensor([lay for lay, _ in sel])
        hi = torch.tensor([h for _, h in sel])
        longest = 0
        for win in windows:
            prompt = self.builder.build(q_ids, [d_ids[i] for i in win], [truncated[i] for i in win])
            longest = max(longest, prompt.length)
            c, r = self._score_prompt(prompt, sel)
            factor = len(win) / n
            for j, doc in enumerate(win):
                cal[li, hi, doc] = c[:, j] * factor
                raw[li, hi, doc] = r[:, j] * factor
        computed = torch.zeros(L, H, dtype=torch.bool)
        computed[li, hi] = True
        return HeadScores(calibrated=cal, raw=raw, computed=computed, windows=windows, prompt_tokens=longest,
                          truncated=truncated)

    @torch.inference_mode()
    def query_embedding(self, query: str, layer: int, pooling: str = "mean") -> torch.Tensor:
        """Hidden state of ``query`` alone at the output of decoder ``layer``: a short pass, before re-ranking.

        The chat template's head is kept in front so the model sees its usual start (BOS, system turn), but only
        the query tokens are pooled (``mean`` or ``last``).
        """
        q_ids = self.builder.encode_query(query)
        ids = list(self.builder.head_ids) + q_ids
        hidden = self._forward(ids, layer, keep_output=True)
        assert hidden is not None
        h = hidden[0, len(ids) - len(q_ids):].float()
        if pooling == "mean":
            return h.mean(0).cpu()
        if pooling == "last":
            return h[-1].cpu()
        raise ValueError(f"unknown pooling {pooling!r}; use 'mean' or 'last'")

    @torch.inference_mode()
    def bare_forward(self, query: str, documents: Sequence[str]) -> int:
        """One plain pass over the whole prompt, all layers, no capture: the speed floor. Returns its length."""
        q_ids = self.builder.encode_query(query)
        d_ids, truncated = self.builder.encode_documents(documents)
        prompt = self.builder.build(q_ids, d_ids, truncated)
        ids = prompt.prefix_ids + prompt.query_ids
        self.base(input_ids=torch.tensor([ids], device=self.lm.device), use_cache=False)
        return len(ids)
