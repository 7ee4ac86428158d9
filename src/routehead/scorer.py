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


@dataclass(frozen=True)
class SpanIndex:
    """Token indices of each document span, padded to the longest: ``idx``/``valid`` ``[docs, width]``.

    Built once per prompt, on the scores' device, so that reducing every layer's rows needs no host-to-device
    copy (each such copy makes the host wait for the GPU).
    """

    idx: torch.Tensor
    valid: torch.Tensor

    @classmethod
    def build(cls, spans: Sequence[tuple[int, int]], device: torch.device | str = "cpu") -> SpanIndex:
        lengths = torch.tensor([e - s for s, e in spans], dtype=torch.long)
        starts = torch.tensor([s for s, _ in spans], dtype=torch.long)
        offs = torch.arange(max(int(lengths.max()) if len(spans) else 0, 1))
        valid = offs[None, :] < lengths[:, None]
        idx = torch.where(valid, starts[:, None] + offs[None, :], torch.zeros_like(offs)[None, :])
        return cls(idx.to(device), valid.to(device))


def mask_outliers_and_sum(token_scores: torch.Tensor, spans: Sequence[tuple[int, int]] | SpanIndex,
                          n_std: float = 2.0) -> torch.Tensor:
    """``[n, T]`` token scores -> ``[n, docs]``: per row and document, drop tokens below mean - n_std * std.

    Population std over the document's tokens (a one-token document keeps its token).
    """
    si = spans if isinstance(spans, SpanIndex) else SpanIndex.build(spans, token_scores.device)
    x = token_scores[:, si.idx]  # [n, D, W]
    v = si.valid.to(x.dtype)
    cnt = v.sum(-1).clamp(min=1)
    mean = (x * v).sum(-1) / cnt
    std = ((((x - mean[..., None]) * v) ** 2).sum(-1) / cnt).sqrt()
    keep = si.valid & (x >= (mean - n_std * std)[..., None])
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
    def _forward(self, ids: list[list[int]], last_layer: int, recorder: capture.Recorder | None = None,
                 keep_output: bool = False, split: capture.Split | None = None,
                 positions: list[list[int]] | None = None) -> torch.Tensor | None:
        input_ids = torch.tensor(ids, device=self.lm.device)
        kw = {} if positions is None else {"position_ids": torch.tensor(positions, device=self.lm.device)}
        with capture.recording(recorder), capture.splitting(split), \
                capture.exit_after(self.layers, last_layer, keep_output) as box:
            self.base(input_ids=input_ids, use_cache=False, **kw)
        return box.get("hidden")

    def _single_pass(self, prompts: Sequence[Prompt], by_layer: dict[int, list[int]],
                     on_layer: Callable[[int, torch.Tensor, torch.Tensor], None]) -> None:
        """One pass over prefix + query + "N/A" of every prompt, one batch row each (see :class:`capture.Split`);
        ``on_layer(layer, q_rows, na_rows)`` gets ``[B, heads, width]`` and ``[B, heads, max prefix + n]``."""
        na = prompts[0].na_ids
        if any(p.na_ids != na for p in prompts):
            raise ValueError("prompts of one batch must share the calibration suffix")
        split = capture.Split(tuple(p.prefix_len for p in prompts),
                              tuple(p.prefix_len + len(p.query_ids) for p in prompts), by_layer, on_layer)
        W = split.width
        ids = [p.prefix_ids + p.query_ids + [0] * (W - m) + na for p, m in zip(prompts, split.main)]
        positions = [list(range(W)) + list(range(p.prefix_len, p.prefix_len + len(na))) for p in prompts]
        self._forward(ids, max(by_layer), split=split, positions=positions)

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
            self._single_pass([prompt], by_layer,
                              lambda lay, q, na: rows.__setitem__(lay, (q[0, :, :P], na[0, :, :P])))
        else:
            recs = []
            for suffix in (prompt.query_ids, prompt.na_ids):
                recs.append(capture.Recorder(by_layer, (P, P + len(suffix))))
                self._forward([prompt.prefix_ids + suffix], max(by_layer), recs[-1])
            rows = {lay: tuple(r.rows[lay][0, :, :P] for r in recs) for lay in by_layer}
        return tuple(torch.cat([rows[lay][i] for lay in sorted(by_layer)]).float().cpu() for i in (0, 1))

    @torch.inference_mode()
    def _score_prompts(self, prompts: Sequence[Prompt], heads: list[Head]
                       ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Calibrated and raw scores ``[len(heads), docs]`` of each prompt, all prompts in one pass.

        Each layer's rows become document scores as soon as the layer has run, so the pass keeps
        ``heads x docs``, never ``heads x prompt tokens`` for all layers at once.
        """
        if not self.single_pass:
            out = []
            for p in prompts:
                q, na = self.query_rows(p, heads)
                both = mask_outliers_and_sum(torch.cat([q - na, q]), p.doc_spans)
                out.append((both[:len(heads)], both[len(heads):]))
            return out
        Pm = max(p.prefix_len for p in prompts)
        spans = SpanIndex.build([(b * Pm + s, b * Pm + e) for b, p in enumerate(prompts) for s, e in p.doc_spans],
                                self.lm.device)  # every prompt's documents, rows laid end to end
        done: dict[int, torch.Tensor] = {}

        def reduce(layer: int, q_rows: torch.Tensor, na_rows: torch.Tensor) -> None:
            q = q_rows[:, :, :Pm]
            both = torch.cat([q - na_rows[:, :, :Pm], q], dim=1)  # [B, 2h, Pm]: calibrated, raw
            done[layer] = mask_outliers_and_sum(both.transpose(0, 1).reshape(both.shape[1], -1), spans)

        by_layer = _by_layer(heads)
        self._single_pass(prompts, by_layer, reduce)
        order = sorted(by_layer)
        cal = torch.cat([done[lay][:len(by_layer[lay])] for lay in order])
        raw = torch.cat([done[lay][len(by_layer[lay]):] for lay in order])
        cal, raw = torch.stack([cal, raw]).float().cpu()  # one copy back, not one a layer
        counts = [len(p.doc_spans) for p in prompts]
        return list(zip(cal.split(counts, dim=1), raw.split(counts, dim=1)))

    # -- public -------------------------------------------------------------------------------------------------
    def score(self, query: str, documents: Sequence[str], heads: Iterable[Head] | None = None) -> HeadScores:
        """``S[layer, head, doc]`` for ``documents`` in input order; only ``heads`` are computed (None: all)."""
        return self.score_many([(query, documents)], heads)[0]

    def score_many(self, items: Sequence[tuple[str, Sequence[str]]], heads: Iterable[Head] | None = None,
                   batch_size: int = 1) -> list[HeadScores]:
        """:meth:`score` for many ``(query, documents)`` pairs, ``batch_size`` prompts per forward pass.

        Batching pays where one prompt leaves a GPU idle (small models, short lists): a pass costs a fixed
        number of kernel launches, however many rows it carries. Prompts are grouped by length (least padding);
        results are the same as one at a time, in input order.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        L, H = self.lm.num_layers, self.lm.num_heads
        sel = normalize_heads(heads, L, H)
        li = torch.tensor([lay for lay, _ in sel])
        hi = torch.tensor([h for _, h in sel])
        results: list[HeadScores] = []
        jobs: list[tuple[int, list[int], Prompt]] = []  # (item, window, prompt)
        per_doc = self.builder.fixed_tokens(1, 0) - self.builder.fixed_tokens(0, 0)
        for i, (query, documents) in enumerate(items):
            q_ids = self.builder.encode_query(query)
            d_ids, truncated = self.builder.encode_documents(documents)
            fixed = self.builder.fixed_tokens(0, len(q_ids))
            windows = plan_windows([len(x) for x in d_ids], per_doc, fixed, self.budget)
            n = len(d_ids)
            computed = torch.zeros(L, H, dtype=torch.bool)
            computed[li, hi] = True
            results.append(HeadScores(calibrated=torch.full((L, H, n), float("nan")),
                                      raw=torch.full((L, H, n), float("nan")), computed=computed,
                                      windows=windows, truncated=truncated))
            for win in windows:
                jobs.append((i, win, self.builder.build(q_ids, [d_ids[j] for j in win], [truncated[j] for j in win])))
        jobs.sort(key=lambda job: job[2].length)
        for k in range(0, len(jobs), batch_size):
            batch = jobs[k:k + batch_size]
            for (i, win, prompt), (c, r) in zip(batch, self._score_prompts([p for _, _, p in batch], sel)):
                S = results[i]
                S.prompt_tokens = max(S.prompt_tokens, prompt.length)
                factor = len(win) / S.num_docs
                for j, doc in enumerate(win):
                    S.calibrated[li, hi, doc] = c[:, j] * factor
                    S.raw[li, hi, doc] = r[:, j] * factor
        return results

    @torch.inference_mode()
    def query_embedding(self, query: str, layer: int, pooling: str = "mean") -> torch.Tensor:
        """Hidden state of ``query`` alone at the output of decoder ``layer``: a short pass, before re-ranking.

        The chat template's head is kept in front so the model sees its usual start (BOS, system turn), but only
        the query tokens are pooled (``mean`` or ``last``).
        """
        q_ids = self.builder.encode_query(query)
        ids = list(self.builder.head_ids) + q_ids
        hidden = self._forward([ids], layer, keep_output=True)
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
