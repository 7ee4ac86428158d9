"""The passes ``bench/speed.py`` times, each a registered method run as :class:`routehead.api.Reranker` runs it.

Modes: ``bare`` (a plain pass, the floor), ``full`` (ICR: every head, sets only), ``full_per_head`` (every head
with each head's own score, as head detection and the store run), ``full_torch`` (``full`` with the span rows by
torch ops), ``static16`` (a fixed set of 16 heads, :func:`static16_heads`), the registered methods with their
shipped assets (:data:`SHIPPED_MODES`: ``static``, the QRHead set; ``single``, its best head; ``core``, the CoRe
set; ``layers``, the Selective-ICR window; a model without the asset skips them, :class:`Skipped`), ``routed``
(RouteHead with the router shipped for the model, or a routed-style set of 4 heads, :func:`routed_heads`, for a
model without one) and ``eager`` (the naive way: ``output_attentions=True``). :func:`layers_run` says how deep
each mode's pass goes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from routehead.assets import router_path
from routehead.engine import capture
from routehead.engine.aggregate import Head, mask_outliers_and_sum
from routehead.engine.model import LoadedModel
from routehead.engine.scorer import HeadScorer, HeadScores
from routehead.errors import RouteheadError
from routehead.selection import load_method
from routehead.selection.base import Method, Selection

# the registered methods timed with the asset shipped for the model (a model without it skips them)
SHIPPED_MODES = ("static", "single", "core", "layers")
MODES = ("bare", "full", "full_per_head", "full_torch", "static16", *SHIPPED_MODES, "routed", "eager")
ALL_LAYER_MODES = ("bare", "full", "full_per_head", "full_torch", "eager")  # passes that run every layer
Item = tuple[str, Sequence[str]]


class Skipped(RouteheadError):
    """A mode this model cannot run (no shipped asset for it); the bench records it as ``"skipped"``."""


def static16_heads(num_layers: int, num_heads: int, k: int = 16) -> list[Head]:
    """16 heads spread evenly over layers ``0 .. L/2 - 1``: ``pool[round(i * (len(pool) - 1) / 15)]`` of the
    pool ``[(l, h) for l < L // 2 for h < H]`` (first and last included; the whole pool if it is smaller)."""
    pool = [(lay, h) for lay in range(max(1, num_layers // 2)) for h in range(num_heads)]
    if len(pool) <= k:
        return pool
    return [pool[round(i * (len(pool) - 1) / (k - 1))] for i in range(k)]


def routed_heads(num_layers: int, num_heads: int, k: int = 4) -> list[Head]:
    """4 heads, the deepest in layer ``d - 1`` for ``d = round(2 L / 3)``: layers ``round(j * (d - 1) / 3)`` and
    heads ``(j * H) // 4`` for ``j = 0..3``."""
    deepest = max(1, round(2 * num_layers / 3)) - 1
    return sorted({(round(j * deepest / (k - 1)), (j * num_heads) // k) for j in range(k)})


def eager_bytes(num_layers: int, num_heads: int, tokens: int, elem: int) -> int:
    """Memory the eager pass needs beyond SDPA: the L returned ``[H, T, T]`` attentions plus ~3 in flight."""
    return (num_layers + 3) * num_heads * tokens * tokens * elem


def mode_method(mode: str, lm: LoadedModel, router: str | None = None) -> Method:
    """The registered method a timed mode runs: ``full``/``full_torch``: ``icr``; ``static16``: ``static`` over
    :func:`static16_heads`; ``static``, ``single``, ``core``, ``layers``: that method with the asset shipped for
    the model (:class:`Skipped` when there is none); ``routed``: ``route`` with ``router`` (a path or a shipped
    variant) or the router shipped for the model, else ``static`` over :func:`routed_heads`."""
    ident, L, H = lm.identity(), lm.num_layers, lm.num_heads
    if mode in ("full", "full_torch"):
        return load_method("icr", ident)
    if mode == "static16":
        return load_method("static", ident, heads=static16_heads(L, H))
    if mode in SHIPPED_MODES:
        try:
            return load_method(mode, ident)
        except RouteheadError as exc:
            raise Skipped(f"{exc}") from exc
    if mode == "routed":
        path, _ = router_path(lm.name, router)
        if path.is_file():
            return load_method("route", ident, router=path)
        return load_method("static", ident, heads=routed_heads(L, H))
    raise ValueError(f"mode {mode!r} runs no head selection")


def _selection(scorer: HeadScorer, method: Method, query: str, documents: Sequence[str] | None) -> Selection:
    """The method's selection for ``query``; a router reading the re-ranking prompt (``prompt-*`` pooling)
    embeds the query after ``documents``, as it does inside the real pass (other poolings ignore them)."""
    if method.embedding is None:
        return method.select()
    return method.select(scorer.query_embedding(query, *method.embedding, documents=documents))


def layers_run(mode: str, scorer: HeadScorer, query: str, router: str | None = None,
               documents: Sequence[str] | None = None) -> int:
    """Decoder layers the mode's scoring pass runs for ``query``: every layer for the all-head and plain passes,
    else the deepest layer its selection reads + 1 (the pass exits after it; a routed mode's separate
    query-embedding pass, where its router has one, is not counted). Raises :class:`Skipped` as
    :func:`mode_method` does."""
    if mode in ALL_LAYER_MODES:
        return scorer.lm.num_layers
    sel = _selection(scorer, mode_method(mode, scorer.lm, router), query, documents)
    return scorer.lm.num_layers if sel.deepest_layer is None else sel.deepest_layer + 1


def routed_source(scorer: HeadScorer, method: Method, query: str, router: str | None = None,
                  documents: Sequence[str] | None = None) -> dict[str, Any]:
    """The heads the ``routed`` mode ran for ``query`` (and ``documents``) and where they came from."""
    if method.embedding is None:
        return {"source": "synthetic", "heads": [list(h) for h in method.select().heads.heads or ()]}
    sel = _selection(scorer, method, query, documents)
    return {"source": router or "shipped router", "embed_layer": method.embedding[0],
            "heads": [list(h) for h in sorted(sel.heads.heads or ())]}


def score_selections(scorer: HeadScorer, items: Sequence[Item], selections: Sequence[Selection],
                     batch_size: int = 1) -> list[HeadScores]:
    """One selection per item, scored ``batch_size`` prompts per pass as ``Reranker.rerank_many`` scores them:
    the union of their heads computed (every head if one reads every head), each item's own set aggregated,
    no per-head scores."""
    heads = None if any(s.heads.heads is None for s in selections) else sorted(
        {h for s in selections for h in s.heads.heads or ()})
    sets = list(dict.fromkeys(s.heads for s in selections))
    return scorer.score_many(items, heads=heads, batch_size=batch_size, sets=sets, per_head=False)


def rerank_pass(scorer: HeadScorer, items: Sequence[Item], method: Method, batch_size: int = 1
                ) -> list[HeadScores]:
    """What ``Reranker`` runs for ``method`` over ``items``. A method that reads no embedding has one selection
    for every query (one call, prompts grouped by length); a routed one embeds each query (a short pass) and
    computes, per batch of ``batch_size`` prompts, the union of the batch's routed heads. A router that reads the
    re-ranking prompt routes inside that pass, as ``Reranker`` runs it where the list fits one prompt."""
    if method.embedding is None:
        return score_selections(scorer, items, [method.select()] * len(items), batch_size)
    routing = method.pass_routing() if scorer.single_pass else None
    if routing is not None and all(len(scorer.plan(q, docs)[2]) == 1 for q, docs in items):
        return scorer.score_many(items, batch_size=batch_size, per_head=False, routing=routing)
    out: list[HeadScores] = []
    for k in range(0, len(items), batch_size):
        batch = items[k:k + batch_size]
        sels = [_selection(scorer, method, q, docs) for q, docs in batch]
        out += score_selections(scorer, batch, sels, batch_size)
    return out


@torch.inference_mode()
def eager_scores(scorer: HeadScorer, query: str, documents: Sequence[str]) -> torch.Tensor:
    """The naive way: one eager pass with ``output_attentions=True``, query rows of every head, doc sums."""
    prompt = scorer.builder.prompt(query, documents)
    ids = prompt.prefix_ids + prompt.query_ids
    P, Q = prompt.prefix_len, len(prompt.query_ids)
    out = scorer.base(input_ids=torch.tensor([ids], device=scorer.lm.device), output_attentions=True,
                      use_cache=False)
    rows = torch.stack([a[0, :, P:P + Q, :P].float().mean(1) for a in out.attentions]).cpu()  # [L, H, P]
    del out
    return mask_outliers_and_sum(rows.flatten(0, 1), prompt.doc_spans)


def mode_call(mode: str, scorer: HeadScorer, query: str, docs: list[str], router: str | None = None
              ) -> Callable[[], Any]:
    """One timed call of ``mode`` on one query and its documents."""
    if mode == "bare":
        return lambda: scorer.bare_forward(query, docs)
    if mode == "full_per_head":
        return lambda: scorer.score(query, docs)
    if mode == "eager":
        return lambda: eager_scores(scorer, query, docs)
    method = mode_method(mode, scorer.lm, router)
    if mode == "full_torch":  # the span rows by torch ops instead of the fused kernels (the same on CPU)
        def full_torch() -> Any:
            with capture.kernel("torch"):
                return rerank_pass(scorer, [(query, docs)], method)
        return full_torch
    return lambda: rerank_pass(scorer, [(query, docs)], method)
