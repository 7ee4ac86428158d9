"""Every default, once: how a pass is scored (:class:`ScoringSettings`) and how a router is fitted
(:class:`FitSettings`). The API, the CLI (whose options are derived from these fields), the stores and the bench
scripts read them from here; the service's own limits live in :mod:`routehead.service.config`. Torch-free.

Each field's ``metadata["help"]`` is the CLI's help text; ``metadata["choices"]`` its choices.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any


def _opt(default: Any, help: str, choices: tuple[str, ...] | None = None) -> Any:
    meta: dict[str, Any] = {"help": help}
    if choices is not None:
        meta["choices"] = choices
    return field(default=default, metadata=meta)


ORDERS = ("reverse", "input", "shuffle", "both")  # prompt orders (:mod:`routehead.engine.order`)
LAYOUTS = ("reference", "v1")  # prompt layouts (:mod:`routehead.engine.prompt`)
POOLINGS = ("mean", "last", "prompt-mean", "prompt-last")  # router inputs (:meth:`HeadScorer.query_embedding`)


@dataclass(frozen=True)
class ScoringSettings:
    """How candidates are laid into the prompt and which of them are re-ranked."""

    top_k: int = _opt(20, "candidates re-ranked per query (for folders with candidates.tsv, the first K of the pool)")
    max_doc_tokens: int = _opt(160, "per-document truncation, in tokens")
    max_chunks_per_doc: int = _opt(1, "long documents: split each into up to N consecutive chunks of max_doc_tokens "
                                   "tokens, each its own passage in the prompt, the document scored by its best "
                                   "chunk (MaxP); 1 = truncation to max_doc_tokens")
    doc_order: str = _opt("reverse", "candidates' order in the prompt: reverse (best last, next to the query: the "
                          "published runs), input (first-stage order), shuffle (a fixed random order per query), "
                          "both (debiased: input and reverse, two passes)", ORDERS)
    retrieval_type: str = _opt("IE", "ICR's late instruction", ("IE", "QA"))
    layout: str = _opt("reference", "prompt layout: reference (the ICR/QRHead code's) or v1 (segments tokenized "
                       "alone, query-only span)", LAYOUTS)
    batch_size: int = _opt(1, "prompts per forward pass when scoring a collection (same scores; more queries/s on a "
                           "GPU with a small model)")
    rerank_batch_size: int = _opt(8, "prompts per forward pass in Reranker.rerank_many (same rankings)")
    depth: int = _opt(100, "first-stage depth kept in runs (the re-ranked top-k, then the rest unchanged)")


@dataclass(frozen=True)
class FitSettings:
    """Router fitting: the pool, pseudo labels, objective and selection of the shipped recipe."""

    objective: str = _opt("listwise", "listwise: through the ranking, probability-weighted heads; bce: the paper's "
                          "BCE on greedy pseudo labels, heads summed", ("listwise", "bce"))
    embed_layer: int = _opt(8, "decoder layer whose output embeds the query")
    pooling: str = _opt("mean", "pooling of the query's hidden states: of the query alone (a short pass), or "
                        "prompt-*: of the query suffix of the re-ranking prompt (the candidates in front)", POOLINGS)
    use_first_stage: bool = _opt(False, "let the router also route the first-stage score")
    balance: bool = _opt(False, "weigh the collections of a merged training view equally (loss, dev nDCG), so the "
                         "largest does not set the routing for all")
    pool_size: int = _opt(64, "only the N best heads alone on the training queries can be routed")
    max_layer: int | None = _opt(None, "a depth budget: route only heads of layers <= L, so every routed pass "
                                 "stops there")
    folds: int = _opt(5, "K cross-fitted routers merged into one (1: one dev split)")
    dev_fraction: float = _opt(0.2, "the dev share when folds is 1")
    labels: str = _opt("greedy", "greedy: binary greedy head sets (the paper); soft: each head's own nDCG@10",
                       ("greedy", "soft"))
    label_max_heads: int = _opt(4, "size cap of a pseudo label (and of the starting set)")
    start: str = _opt("single", "listwise: the static selection training starts from: the single head best alone "
                      "on the training queries, or the greedy set best on them together", ("single", "set"))
    route_max: int = _opt(8, "most heads a router routes for one query")
    dim: int = _opt(64, "router embedding size")
    sparsity: float = _opt(0.0, "weight of the mean routing probability in the loss")
    depth_cost: float = _opt(0.0, "weight of the expected fraction of layers a routed pass runs (cost-aware "
                             "routing; early stopping and the threshold maximise dev nDCG@10 - this x layers run)")
    bce_weight: float = _opt(0.0, "listwise: auxiliary pseudo-label BCE weight")
    temperature: float = _opt(4.0, "listwise: softmax temperature on the aggregated document scores")
    epochs: int = _opt(500, "most training epochs")
    lr: float = _opt(3e-3, "AdamW learning rate")
    weight_decay: float = _opt(1e-2, "AdamW weight decay")
    eval_every: int = _opt(10, "epochs between dev evaluations")
    patience: int = _opt(8, "dev evaluations without improvement before stopping")
    seed: int = _opt(0, "random seed")
    restarts: int = _opt(1, "routers fitted per fold from seeds seed, seed+1, ... and merged (mean logits): one "
                         "seed's router can settle in a different mode (a shallow head or a deep set)")


SCORING = ScoringSettings()
FIT = FitSettings()
DEFAULT_ORDER = SCORING.doc_order
DEFAULT_MAX_DOC_TOKENS = SCORING.max_doc_tokens
DEFAULT_MAX_CHUNKS = SCORING.max_chunks_per_doc
DEFAULT_LAYOUT = SCORING.layout


def field_help(cls: type, name: str) -> dict[str, Any]:
    """The metadata of one settings field (for deriving a CLI option from it)."""
    return next(f.metadata for f in fields(cls) if f.name == name)
