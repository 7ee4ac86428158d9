"""Document scores from one forward pass over the prompt: any head set, aggregated as the references do.

Flow: one forward pass over ``prefix + query suffix + "N/A" suffix`` (prefix = instruction + documents), in
which the "N/A" suffix sees only the prefix and itself, at the positions right after the prefix
(:class:`capture.Split`): both suffixes come out of one pass with no KV cache, so time and memory are those
of one plain pass over the prompt. For each computed head, the attention the query span pays to each prefix
token is averaged over the span's rows; a token's calibrated score is ``attn(query) - attn("N/A")``.

Aggregation (ICR's ``masked_NA_calibration``, QRHead's ``score_docs``): for a head set, the calibrated token
scores are summed over its heads first; then, per document, tokens not above ``mean - 2 std`` (unbiased std,
over the document's tokens) are masked out and the rest summed. A one-token or constant document scores 0.
:class:`HeadSet` selections are aggregated this way inside the pass, from the token rows of their heads.
Per head (a set of one head, QRHead's detection score) the same rule gives ``S[layer, head, doc]``; and the
per-token rows themselves can be kept (``keep_tokens``) so that offline work aggregates exactly as inference.

Long lists: when the prompt would exceed the model's context (or ``max_prompt_tokens``), the documents are
split into near-equal contiguous windows scored separately. A calibrated score is a share of attention mass
spread over the window's documents, so each window's scores are multiplied by ``len(window) / n_docs``:
a positive per-window factor, so order within a window is kept, and equal documents in windows of different
size get comparable scores.

Long documents (``max_chunks_per_doc`` > 1, :class:`prompt.Chunks`): each chunk is scored as a document of its
own, in the same prompt as the other passages (a document's chunks adjacent, and in one window), and the document
takes its best chunk's score (MaxP): every score of :class:`HeadScores` (each head set, each head alone) is the
maximum over the document's chunks, so a document's score is what its most relevant part earns; windows and the
token rows stay per chunk (``HeadScores.chunks`` says how many each document has).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch

from routehead.engine import capture
from routehead.engine.aggregate import Head, HeadSet, SpanIndex, mask_outliers_and_sum
from routehead.engine.model import LoadedModel
from routehead.engine.prompt import Chunks, Prompt, PromptBuilder, plan_windows
from routehead.settings import DEFAULT_LAYOUT, DEFAULT_MAX_CHUNKS, DEFAULT_MAX_DOC_TOKENS, POOLINGS, SCORING


@dataclass
class TokenScores:
    """Calibrated token scores of the computed heads over each document's span, spans laid end to end."""

    rows: torch.Tensor  # [computed heads, sum of span lengths], float32, CPU
    counts: list[int]  # span length of each document, in input order
    heads: list[Head]  # the row order


@dataclass
class HeadScores:
    """Scores of every document under every computed head; NaN where a head was not computed."""

    calibrated: torch.Tensor  # [layers, heads, docs], float32, CPU: each head alone, masked (QRHead detection)
    raw: torch.Tensor  # the same from the query's attention alone (no "N/A" calibration)
    raw_sum: torch.Tensor  # [layers, heads, docs]: the query's attention mass on the document, unmasked (CoRe)
    computed: torch.Tensor  # [layers, heads] bool: heads with per-head scores (none with ``per_head=False``)
    sets: torch.Tensor | None = None  # [len(sets), docs]: each requested HeadSet, summed then masked
    tokens: TokenScores | None = None  # with keep_tokens: every computed head's token scores
    set_tokens: TokenScores | None = None  # with keep_tokens: each set's summed token scores (before the mask)
    token_ids: list[list[int]] = field(default_factory=list)  # with keep_tokens: each document span's token ids
    windows: list[list[int]] = field(default_factory=list)  # passages (chunks, when chunked) in each window
    prompt_tokens: int = 0  # tokens run for the longest window (prefix + query suffix)
    truncated: list[bool] = field(default_factory=list)  # per document: was text left out
    # chunked scoring only (max_chunks_per_doc > 1; empty otherwise): chunks per document, whose token rows
    # (tokens, set_tokens, token_ids) run chunk by chunk; and [sets, docs], the best chunk of each document
    # (0 = its first) under each set, the one its score is
    chunks: list[int] = field(default_factory=list)
    best_chunk: torch.Tensor | None = None
    routed: Any = None  # routing inside the pass (PassRouting): the router's selection for this query

    @property
    def num_docs(self) -> int:
        return int(self.calibrated.shape[-1])

    def chunk_starts(self) -> list[int]:
        """Index of each document's first passage among the token rows' spans (documents alone: ``0..n-1``)."""
        counts = self.chunks or [1] * self.num_docs
        return np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(int).tolist()


class Routed(Protocol):
    """What a router returns for one prompt: at least the head set to aggregate (``Selection`` is one)."""

    @property
    def heads(self) -> HeadSet: ...


@dataclass(frozen=True)
class PassRouting:
    """Routing inside the re-ranking pass itself (a router that reads the query in the prompt, ``prompt-*``).

    Why: such a router needs layer ``layer``'s output over the prompt's query suffix, which the re-ranking pass
    computes anyway; routing there costs no second pass. The pass keeps the rows of every ``pool`` head up to
    ``layer`` (it cannot know yet which will be routed), calls ``route(embedding)`` per prompt once ``layer`` has
    run, then computes only the routed heads' rows of the deeper layers and stops after the deepest routed one.
    The scores equal those of routing first (a separate pass up to ``layer``) and scoring the routed set.
    """

    layer: int  # the decoder layer whose output embeds the query
    pooling: str  # prompt-mean | prompt-last, over the query suffix's tokens
    pool: tuple[Head, ...]  # every head the router may route
    route: Callable[[torch.Tensor], Routed]  # one prompt's embedding [hidden] -> its selection

    def __post_init__(self) -> None:
        if self.pooling not in POOLINGS or not self.pooling.startswith("prompt-"):
            raise ValueError(f"routing inside the pass reads the prompt: pooling {self.pooling!r} is not prompt-*")


def pool_tokens(hidden: torch.Tensor, pooling: str) -> torch.Tensor:
    """A query embedding from its tokens' hidden states ``[tokens, hidden]``: their mean (``mean``,
    ``prompt-mean``) or the last one (``last``, ``prompt-last``), float32 on the CPU."""
    if pooling not in POOLINGS:
        raise ValueError(f"unknown pooling {pooling!r}; use one of {POOLINGS}")
    h = hidden.float()
    return (h[-1] if pooling.endswith("last") else h.mean(0)).cpu()


def maxp(S: HeadScores, chunks: Chunks) -> HeadScores:
    """``S`` scored per chunk, as per document: every score the maximum over the document's chunks (MaxP), the
    best chunk of each set kept; token rows, spans and windows stay per chunk (see :attr:`HeadScores.chunks`)."""
    counts = chunks.counts
    bounds = np.concatenate([[0], np.cumsum(counts)]).astype(int).tolist()
    parts = list(zip(bounds[:-1], bounds[1:]))

    def best(x: torch.Tensor) -> torch.Tensor:  # [..., chunks] -> [..., docs]; NaN (head not computed) stays NaN
        return torch.stack([x[..., a:b].amax(-1) for a, b in parts], -1)

    top = [S.sets[:, a:b].max(-1) for a, b in parts]
    return HeadScores(calibrated=best(S.calibrated), raw=best(S.raw), raw_sum=best(S.raw_sum), computed=S.computed,
                      sets=torch.stack([t.values for t in top], -1) if parts else S.sets,
                      tokens=S.tokens, set_tokens=S.set_tokens, token_ids=S.token_ids, windows=S.windows,
                      prompt_tokens=S.prompt_tokens, truncated=list(chunks.truncated), chunks=counts,
                      best_chunk=torch.stack([t.indices for t in top], -1) if parts else None, routed=S.routed)


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


def set_weights(sets: Sequence[HeadSet], sel: list[Head]) -> torch.Tensor:
    """``[len(sets), len(sel)]``: each set's weight on each computed head (0 where not in the set)."""
    pos = {h: i for i, h in enumerate(sel)}
    W = np.zeros((len(sets), len(sel)), dtype=np.float32)  # numpy: one tensor op per head costs ~1k on an 8B
    for k, hs in enumerate(sets):
        heads = sel if hs.heads is None else list(hs.heads)
        ws = hs.weights or (1.0,) * len(heads)
        for h, w in zip(heads, ws):
            if h not in pos:
                raise ValueError(f"head {h} of a head set is not among the computed heads")
            W[k, pos[h]] += w
    return torch.from_numpy(W)


def _outputs(prompts: Sequence[Prompt], acc: torch.Tensor, spans: SpanIndex, by_layer: dict[int, list[int]],
             done: dict[int, torch.Tensor] | None, toks: dict[int, torch.Tensor] | None, keep_tokens: bool,
             chosen: list[Any]) -> list[dict[str, Any]]:
    """Per prompt, what :meth:`HeadScorer._score_prompts` returns, from the pass's accumulators: the sets' token
    sums ``acc`` ``[B, sets, prefix]``; per layer, each head's masked sums (``done``) and token rows (``toks``),
    where they were kept; the router's selections (``chosen``), when it routed inside the pass."""
    B, S, Pm = acc.shape
    order = sorted(by_layer)
    flat = acc.transpose(0, 1).reshape(S, B * Pm)
    counts = [len(p.doc_spans) for p in prompts]
    out: list[dict[str, Any]] = [{"sets": t} for t in mask_outliers_and_sum(flat, spans).float().cpu()
                                 .split(counts, dim=1)]
    for o, c in zip(out, chosen):
        o["routed"] = c
    if done is not None:  # per layer: each head's calibrated, raw (both masked) and raw unmasked sums
        nh = {lay: len(by_layer[lay]) for lay in order}
        for k, name in enumerate(("cal", "raw", "raw_sum")):
            rows = torch.cat([done[lay][k * nh[lay]:(k + 1) * nh[lay]] for lay in order])
            for o, r in zip(out, rows.float().cpu().split(counts, dim=1)):
                o[name] = r
    if keep_tokens:
        lens = [sum(e - s for s, e in p.doc_spans) for p in prompts]
        for o, st in zip(out, flat[:, spans.flat].float().cpu().split(lens, dim=1)):
            o["set_tokens"] = st
        if toks is not None:  # routed: the rows of heads no prompt was routed to were never computed
            for o, t in zip(out, torch.cat([toks[lay] for lay in order]).float().cpu().split(lens, dim=1)):
                o["tokens"] = t
    return out


def _token_parts(out: dict[str, Any], prompt: Prompt, window: list[int], factor: float
                 ) -> dict[int, tuple[torch.Tensor | None, torch.Tensor, list[int]]]:
    """One window's token rows per document (scaled by the window's factor): every computed head's (None where
    not kept), the sets', and the document span's token ids."""
    rows, bounds = out.get("tokens"), [0]
    for s, e in prompt.doc_spans:
        bounds.append(bounds[-1] + e - s)
    parts = {}
    for j, doc in enumerate(window):
        a, b = bounds[j], bounds[j + 1]
        s0, e0 = prompt.doc_spans[j]
        parts[doc] = (None if rows is None else rows[:, a:b] * factor, out["set_tokens"][:, a:b] * factor,
                      prompt.prefix_ids[s0:e0])
    return parts


def _attach_tokens(S: HeadScores, docs: list[tuple[torch.Tensor | None, torch.Tensor, list[int]]],
                   heads: list[Head]) -> None:
    """Each document's token rows (every computed head's, where kept; the sets'; its token ids), in input order."""
    counts = [len(d[2]) for d in docs]
    if all(d[0] is not None for d in docs):
        S.tokens = TokenScores(rows=torch.cat([d[0] for d in docs], dim=1), counts=counts, heads=list(heads))
    S.set_tokens = TokenScores(rows=torch.cat([d[1] for d in docs], dim=1), counts=counts, heads=[])
    S.token_ids = [list(d[2]) for d in docs]


class HeadScorer:
    """Scores documents for a query with every (or some) attention heads of a frozen causal LM."""

    def __init__(self, lm: LoadedModel, max_doc_tokens: int | None = DEFAULT_MAX_DOC_TOKENS,
                 max_prompt_tokens: int | None = None, use_chat_template: bool = True,
                 retrieval_type: str = SCORING.retrieval_type, instruction: str | None = None,
                 layout: str = DEFAULT_LAYOUT, max_chunks_per_doc: int = DEFAULT_MAX_CHUNKS) -> None:
        self.lm = lm
        self.builder = PromptBuilder(lm.tokenizer, max_doc_tokens=max_doc_tokens, use_chat_template=use_chat_template,
                                     retrieval_type=retrieval_type, instruction=instruction, layout=layout,
                                     max_chunks_per_doc=max_chunks_per_doc)
        self.budget = min(lm.max_context, max_prompt_tokens or lm.max_context)
        capture.install(lm.model)
        self.base = lm.model.get_decoder() if hasattr(lm.model, "get_decoder") else lm.model
        self.layers = capture.decoder_layers(lm.model)
        self.single_pass = capture.split_supported(lm.model.config)

    def settings(self) -> dict[str, Any]:
        """Everything that changes scores, for stores and checkpoints."""
        return {**self.lm.identity(), "dtype": str(self.lm.dtype).replace("torch.", ""), "budget": self.budget,
                **self.builder.settings()}

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
                     on_layer: Callable[[int, torch.Tensor, torch.Tensor], None],
                     at_layer: tuple[int, Callable[[capture.Split, torch.Tensor], None]] | None = None) -> None:
        """One pass over prefix + query suffix + "N/A" suffix of every prompt, one batch row each (see
        :class:`capture.Split`); ``on_layer(layer, q_rows, na_rows)`` gets ``[B, heads, width]`` and
        ``[B, heads, max prefix + n]``. ``at_layer = (layer, fn)``: ``fn(split, hidden)`` gets that layer's output
        ``[B, T, hidden]`` and may change ``split.heads`` for the layers after it (``by_layer`` then needs a key
        past the last layer, so that no layer before ``fn`` is taken for the deepest) or raise ``StopForward``."""
        na = prompts[0].na_ids
        if any(p.na_ids != na for p in prompts):
            raise ValueError("prompts of one batch must share the calibration suffix")
        split = capture.Split(tuple(p.prefix_len for p in prompts),
                              tuple(p.prefix_len + len(p.query_ids) for p in prompts), by_layer, on_layer)
        W = split.width
        ids = [p.prefix_ids + p.query_ids + [0] * (W - m) + na for p, m in zip(prompts, split.main)]
        positions = [list(range(W)) + list(range(p.prefix_len, p.prefix_len + len(na))) for p in prompts]
        if at_layer is None:
            self._forward(ids, max(by_layer), split=split, positions=positions)
            return
        layer, fn = at_layer
        handle = self.layers[layer].register_forward_hook(
            lambda _m, _a, out: fn(split, out[0] if isinstance(out, tuple) else out))
        try:
            self._forward(ids, self.lm.num_layers - 1, split=split, positions=positions)
        finally:
            handle.remove()

    @torch.inference_mode()
    def query_rows(self, prompt: Prompt, heads: list[Head], single_pass: bool | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """Attention rows ``[len(heads), prefix_len]`` of the query span and of its "N/A" twin, mean over rows.

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
    def _score_prompts(self, prompts: Sequence[Prompt], heads: list[Head], W_sets: torch.Tensor,
                       keep_tokens: bool, per_head: bool = True, routing: PassRouting | None = None
                       ) -> list[dict[str, Any]]:
        """Per prompt: ``sets`` ``[sets, docs]`` (summed over each set's heads, then masked); with ``per_head``,
        ``cal``/``raw`` ``[heads, docs]`` (each head masked alone); with ``keep_tokens``, ``tokens``
        ``[heads, span tokens]``.

        Each layer's rows are reduced as soon as the layer has run: the pass keeps the sets' token sums
        ``[sets, prefix]`` and (only with ``keep_tokens``) the document tokens' rows, never rows of all layers.
        Without ``per_head`` a layer costs a subtraction and one weighted sum over its heads, nothing per head:
        re-ranking needs only the sets, and on a GPU every small op a layer adds is host time.

        ``routing`` (:class:`PassRouting`; ``heads`` is then its pool, ``per_head`` off): one set per prompt,
        the router's, chosen inside the pass (``routed``: its selection); the pool heads' rows up to the routing
        layer wait for the choice (at most the pool's heads of those layers, ``[B, heads, prefix]`` each).
        """
        if not self.single_pass and len(prompts) > 1:
            return [o for p in prompts for o in self._score_prompts([p], heads, W_sets, keep_tokens, per_head)]
        B, Pm = len(prompts), max(p.prefix_len for p in prompts)
        spans = SpanIndex.build([(b * Pm + s, b * Pm + e) for b, p in enumerate(prompts) for s, e in p.doc_spans],
                                self.lm.device)  # every prompt's documents, rows laid end to end
        by_layer = _by_layer(heads)
        cols: dict[int, Any] = {}  # each layer's computed heads: their columns among ``heads``
        for i, (lay, _) in enumerate(heads):
            cols.setdefault(lay, slice(i, i + len(by_layer[lay])))
        # each prompt's weights on every head [B, sets, heads]: the sets' (shared), or the router's once it chose
        Wb = (torch.zeros(B, 1, len(heads)) if routing else W_sets[None].expand(B, -1, -1)).to(self.lm.device)
        acc = torch.zeros(B, Wb.shape[1], Pm, device=self.lm.device)
        done: dict[int, torch.Tensor] = {}
        toks: dict[int, torch.Tensor] = {}
        pending: list[tuple[int, torch.Tensor]] = []  # routing: rows of the layers run before the choice
        chosen: list[Any] = []

        def reduce(layer: int, q_rows: torch.Tensor, na_rows: torch.Tensor) -> None:
            q = q_rows[:, :, :Pm].float()
            cal = q - na_rows[:, :, :Pm].float()  # [B, h, Pm]
            n = cal.shape[1]
            if routing is not None and not chosen:
                pending.append((layer, cal))
                return
            acc.add_(torch.einsum("bsh,bht->bst", Wb[:, :, cols[layer]], cal))
            if per_head:  # each head alone: calibrated rows, then raw rows, prompts laid end to end
                both = torch.cat([cal, q], dim=1).transpose(0, 1).reshape(2 * n, -1)
                raw = both[n:, spans.idx]
                done[layer] = torch.cat([mask_outliers_and_sum(both, spans), (raw * spans.valid).sum(-1)])
            if keep_tokens and routing is None:
                toks[layer] = cal.transpose(0, 1).reshape(n, -1)[:, spans.flat]

        def route(split: capture.Split, hidden: torch.Tensor) -> None:
            assert routing is not None
            chosen.extend(routing.route(pool_tokens(hidden[b, p:m], routing.pooling)) for b, (p, m)
                          in enumerate(zip(split.prefix, split.main)))
            Wb.copy_(torch.stack([set_weights([c.heads], heads) for c in chosen]).to(self.lm.device))
            for layer, cal in pending:
                acc.add_(torch.einsum("bsh,bht->bst", Wb[:, :, cols[layer]], cal))
            pending.clear()
            split.heads.clear()  # from here on, only the routed heads of the deeper layers
            at = {h: i for i, h in enumerate(heads)}
            deeper = sorted({h for c in chosen for h in (c.heads.heads or ()) if h[0] > routing.layer})
            for lay, hs in _by_layer(deeper).items():
                split.heads[lay] = hs
                cols[lay] = torch.tensor([at[(lay, h)] for h in hs], device=self.lm.device)
            if not deeper:
                raise capture.StopForward

        if routing is not None:
            early = {lay: hs for lay, hs in by_layer.items() if lay <= routing.layer}
            self._single_pass(prompts, {**early, self.lm.num_layers: []}, reduce, at_layer=(routing.layer, route))
        elif self.single_pass:
            self._single_pass(prompts, by_layer, reduce)
        else:  # two full passes (one prompt at a time, see above)
            q, na = (x.to(self.lm.device) for x in self.query_rows(prompts[0], heads, single_pass=False))
            for lay, sl in cols.items():
                reduce(lay, q[None, sl], na[None, sl])
        return _outputs(prompts, acc, spans, by_layer, done if per_head else None,
                        toks if keep_tokens and routing is None else None, keep_tokens, chosen)

    # -- public -------------------------------------------------------------------------------------------------
    def score(self, query: str, documents: Sequence[str], heads: Iterable[Head] | None = None,
              sets: Sequence[HeadSet] = (), keep_tokens: bool = False, per_head: bool = True,
              max_chunks_per_doc: int | None = None) -> HeadScores:
        """Scores of ``documents`` (in prompt order) for ``query``; only ``heads`` are computed (None: all).

        ``sets``: head sets aggregated as the references do (``HeadScores.sets``); their heads must be computed.
        ``per_head=False`` skips each head's own masked score (``calibrated``/``raw`` stay NaN): re-ranking with
        ``sets`` does not need them, head detection does. ``max_chunks_per_doc``: this call's chunking (None: the
        builder's; see :mod:`routehead.engine.prompt`).
        """
        return self.score_many([(query, documents)], heads, sets=sets, keep_tokens=keep_tokens, per_head=per_head,
                               max_chunks_per_doc=max_chunks_per_doc)[0]

    def plan(self, query: str, documents: Sequence[str], max_chunks_per_doc: int | None = None
             ) -> tuple[str, Chunks, list[list[int]], int, int]:
        """How ``documents`` (prompt order) go into prompts: the prepared query, the passages (:class:`Chunks`),
        the windows (passage indices, a document's chunks in one window), and the tokens a window needs besides
        its passages' own (``fixed``) and per passage (``per_doc``, an upper estimate)."""
        q = self.builder.prepare_query(query)
        chunks = self.builder.chunk_documents(documents, max_chunks_per_doc)
        fixed = self.builder.fixed_tokens(0, q)
        per_doc = -(-(self.builder.fixed_tokens(len(chunks.texts), q) - fixed) // len(chunks.texts))
        windows = plan_windows(chunks.lengths, per_doc, fixed, self.budget, groups=chunks.owner)
        return q, chunks, windows, fixed, per_doc

    def score_many(self, items: Sequence[tuple[str, Sequence[str]]], heads: Iterable[Head] | None = None,
                   batch_size: int = 1, sets: Sequence[HeadSet] = (), keep_tokens: bool = False,
                   per_head: bool = True, max_chunks_per_doc: int | None = None,
                   routing: PassRouting | None = None) -> list[HeadScores]:
        """:meth:`score` for many ``(query, documents)`` pairs, ``batch_size`` prompts per forward pass.

        Batching pays where one prompt leaves a GPU idle (small models, short lists): a pass costs a fixed
        number of kernel launches, however many rows it carries. Prompts are grouped by length (least padding);
        results are the same as one at a time, in input order. With chunking (``max_chunks_per_doc``, default
        the builder's, > 1) each result is per document, the maximum over its chunks (:func:`maxp`).

        ``routing`` (:class:`PassRouting`): each query's heads are routed inside its pass (``heads``, ``sets`` and
        ``per_head`` do not apply): ``sets`` holds the routed set's scores, ``routed`` the router's selection.
        Each list must fit one prompt (one window), since the router reads the query next to its candidates.
        """
        if routing is not None:
            heads = self._routable(routing, heads, sets, per_head)
        chunking = (self.builder.max_chunks_per_doc if max_chunks_per_doc is None else max_chunks_per_doc) > 1
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        L, H = self.lm.num_layers, self.lm.num_heads
        sel = normalize_heads(heads, L, H)
        W_sets = torch.zeros(1, len(sel)) if routing else set_weights(sets, sel)
        li = torch.tensor([lay for lay, _ in sel])
        hi = torch.tensor([h for _, h in sel])
        results: list[HeadScores] = []
        jobs: list[tuple[int, list[int], Prompt]] = []  # (item, window, prompt)
        passages: list[Chunks] = []
        for i, (query, documents) in enumerate(items):
            q, chunks, windows, _, _ = self.plan(query, documents, max_chunks_per_doc)
            passages.append(chunks)
            texts, truncated = chunks.texts, chunks.cut
            n = len(texts)
            computed = torch.zeros(L, H, dtype=torch.bool)
            computed[li, hi] = per_head
            results.append(HeadScores(calibrated=torch.full((L, H, n), float("nan")),
                                      raw=torch.full((L, H, n), float("nan")),
                                      raw_sum=torch.full((L, H, n), float("nan")), computed=computed,
                                      sets=torch.zeros(W_sets.shape[0], n), windows=windows, truncated=truncated))
            if routing is not None and len(windows) > 1:
                raise ValueError("routing inside the pass needs a list that fits one prompt; route it first")
            for win in windows:
                jobs.append((i, win, self.builder.build(q, [texts[j] for j in win], [truncated[j] for j in win])))
        jobs.sort(key=lambda job: (tuple(job[2].na_ids), job[2].length))
        parts: dict[int, dict[int, torch.Tensor]] = {}
        k = 0
        while k < len(jobs):
            batch = [jobs[k]]
            while len(batch) < batch_size and k + len(batch) < len(jobs) \
                    and jobs[k + len(batch)][2].na_ids == batch[0][2].na_ids:
                batch.append(jobs[k + len(batch)])
            k += len(batch)
            for (i, win, prompt), out in zip(batch, self._score_prompts([p for _, _, p in batch], sel, W_sets,
                                                                        keep_tokens, per_head, routing)):
                S = results[i]
                S.routed = out.get("routed")
                S.prompt_tokens = max(S.prompt_tokens, prompt.length)
                factor = len(win) / S.num_docs
                for j, doc in enumerate(win):
                    S.sets[:, doc] = out["sets"][:, j] * factor
                    if per_head:
                        S.calibrated[li, hi, doc] = out["cal"][:, j] * factor
                        S.raw[li, hi, doc] = out["raw"][:, j] * factor
                        S.raw_sum[li, hi, doc] = out["raw_sum"][:, j] * factor
                if keep_tokens:
                    parts.setdefault(i, {}).update(_token_parts(out, prompt, win, factor))
        if keep_tokens:
            for i, S in enumerate(results):
                _attach_tokens(S, [parts[i][d] for d in range(S.num_docs)], sel)
        return [maxp(S, c) for S, c in zip(results, passages)] if chunking else results

    def _routable(self, routing: PassRouting, heads: Iterable[Head] | None, sets: Sequence[HeadSet],
                  per_head: bool) -> list[Head]:
        """The heads a pass routed inside itself computes (the router's pool), or why it cannot run."""
        if sets or per_head or heads is not None:
            raise ValueError("routing inside the pass scores the routed set only: no heads, sets or per_head")
        if not self.single_pass:
            raise ValueError("routing inside the pass needs a model whose masks the single pass supports")
        return list(routing.pool)

    @torch.inference_mode()
    def query_embedding(self, query: str, layer: int, pooling: str = "mean",
                        documents: Sequence[str] | None = None) -> torch.Tensor:
        """Hidden state of ``query`` at the output of decoder ``layer``.

        ``mean``/``last``: the query alone, a short pass before re-ranking. The chat template's head is kept in
        front so the model sees its usual start (BOS, system turn), but only the query tokens are pooled.
        ``prompt-mean``/``prompt-last``: the query suffix (late instruction, query, template end) of the
        re-ranking prompt itself, ``documents`` in prompt order in front of it (the first window of a list that
        does not fit), so the embedding has read the candidates: the router sees the query in its domain.
        """
        if pooling not in POOLINGS:
            raise ValueError(f"unknown pooling {pooling!r}; use one of {POOLINGS}")
        if pooling.startswith("prompt-"):
            if documents is None:
                raise ValueError(f"pooling {pooling!r} reads the re-ranking prompt: pass its documents")
            prompt = self.window_prompts(query, documents)[0]
            ids, start = prompt.prefix_ids + prompt.query_ids, prompt.prefix_len
        else:
            q_ids = self.builder.encode_query(query)
            ids = list(self.builder.head_ids) + q_ids
            start = len(ids) - len(q_ids)
        hidden = self._forward([ids], layer, keep_output=True)
        assert hidden is not None
        return pool_tokens(hidden[0, start:], pooling)

    def window_prompts(self, query: str, documents: Sequence[str], max_chunks_per_doc: int | None = None
                       ) -> list[Prompt]:
        """The prompts :meth:`score` runs for ``documents``: one, or one per window when the list does not fit
        the budget (:meth:`plan`)."""
        q, chunks, windows, _, _ = self.plan(query, documents, max_chunks_per_doc)
        return [self.builder.build(q, [chunks.texts[j] for j in win], [chunks.cut[j] for j in win])
                for win in windows]

    @torch.inference_mode()
    def bare_forward(self, query: str, documents: Sequence[str]) -> list[int]:
        """Plain passes (all layers, no capture, SDPA with ``is_causal``) over prefix + query of every prompt
        :meth:`score` runs for ``documents`` (:meth:`window_prompts`): the speed floor of scoring them. A list
        that does not fit the budget is scored in windows, and one plain pass over the whole list would then do
        more attention work than scoring it (quadratic in the length). Returns each pass's length."""
        lengths = []
        for prompt in self.window_prompts(query, documents):
            ids = prompt.prefix_ids + prompt.query_ids
            self.base(input_ids=torch.tensor([ids], device=self.lm.device), use_cache=False)
            lengths.append(len(ids))
        return lengths
