"""Head detection on training queries: which heads (or layers) rank the judged documents best.

Three rules, each reading the stored passes (:mod:`routehead.offline.views`), no extra forward pass:

- QRHead's (princeton-pli/QRHead, :func:`detect_heads`): each head's calibrated, masked document scores alone; its
  mean nDCG@k over the detection queries; the top heads kept.
- CoRe's (linhhtran/CoRe-Reranking, :func:`detect_core`): each head's contrastive score, the softmax (temperature
  t) of its uncalibrated, unmasked attention mass over a judged positive and the hard negatives, at the positive,
  averaged over (query, positive) samples; the top heads kept.
- Selective-ICR's window (:func:`detect_window`): the per-layer analysis of ielab/Selective-ICR (every head of one
  layer, calibrated, masked), and the contiguous run of layers whose own score has the best mean nDCG@k.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from routehead.engine.aggregate import Head, set_scores, spans_of
from routehead.errors import RouteheadError
from routehead.metrics import ndcg_at_k
from routehead.offline.collect import ScoredCollection
from routehead.offline.views import gains, head_rows, tokens_of

CORE_TOP = 8  # the authors' --num_head
CORE_TEMPERATURE = 0.1  # the authors' best for Llama-family models (0.001 for Mistral and Granite)


def per_head_quality(S: np.ndarray, gains: np.ndarray, ideal: Sequence[float], k: int = 10) -> np.ndarray:
    """nDCG@k of every head alone for one query: ``[layers, heads]``; -inf for a head not computed (NaN), so
    that it ranks last instead of inheriting the candidates' (first-stage) order from tied scores."""
    L, H, D = S.shape
    flat = S.reshape(L * H, D)
    q = ndcg_at_k(flat, gains, ideal, k)
    q[np.isnan(flat).any(-1)] = -np.inf
    return q.reshape(L, H)


def top_heads(quality: np.ndarray, top: int) -> list[Head]:
    """The ``top`` heads by mean quality ``[layers, heads]``; ties broken by (layer, head) for determinism."""
    L, H = quality.shape
    flat = [(-float(quality[lay, h]), lay, h) for lay in range(L) for h in range(H)]
    return [(lay, h) for _, lay, h in sorted(flat)[:top]]


def detect_heads(sc: ScoredCollection, top: int = 16, qids: Sequence[str] | None = None, k: int = 10,
                 max_layer: int | None = None) -> tuple[list[Head], np.ndarray]:
    """QRHead-style detection: each head's mean nDCG@k alone on ``qids``; the ``top`` best heads.

    ``max_layer``: choose only among heads of layers ``<= max_layer`` (the quality map is still returned whole),
    so that a pass scoring the chosen heads can stop after that layer: a depth budget traded against quality.
    """
    ids = list(qids) if qids is not None else sorted(sc.entries)
    qual = []
    for qid in ids:
        e = sc.entries[qid]
        g, ideal = gains(sc, qid, e.doc_ids)
        qual.append(per_head_quality(e.calibrated, g, ideal, k))  # not computed: -inf, ranks last
    q = np.mean(qual, axis=0)
    if max_layer is not None and not 0 <= max_layer < q.shape[0]:
        raise RouteheadError(f"max_layer {max_layer} is not a layer of this model (0..{q.shape[0] - 1})")
    return top_heads(q if max_layer is None else q[: max_layer + 1], top), q


def layer_limit(num_layers: int, prune: float = 0.0, max_layer: int | None = None) -> int:
    """How many leading layers a detection may choose from: CoRe's pruning keeps layers ``< int(L * (1 - prune))``
    (the authors' ``int(num_hidden_layers * (1 - prune))``); ``max_layer`` keeps layers ``<= max_layer``."""
    if prune and max_layer is not None:
        raise RouteheadError("give a pruning fraction or a max layer, not both")
    if max_layer is not None:
        if not 0 <= max_layer < num_layers:
            raise RouteheadError(f"max_layer {max_layer} is not a layer of this model (0..{num_layers - 1})")
        return max_layer + 1
    if not 0 <= prune < 1:
        raise RouteheadError(f"prune is the fraction of final layers left out, in [0, 1); got {prune}")
    keep = math.floor(num_layers * (1 - prune))
    if keep < 1:
        raise RouteheadError(f"prune {prune} leaves no layer of {num_layers}")
    return keep


def contrastive_scores(S: np.ndarray, positive: int, negatives: Sequence[int], temperature: float) -> np.ndarray:
    """CoRe's score of every head for one sample, ``[layers, heads]``: over the positive and the negatives'
    attention mass ``S[..., d]``, ``exp(s(d+)/t) / (exp(s(d+)/t) + sum_n exp(s(d-)/t))``, by logsumexp (float64)."""
    if temperature <= 0:
        raise RouteheadError(f"the temperature must be > 0, got {temperature}")
    x = S[..., [int(positive), *(int(n) for n in negatives)]].astype(np.float64) / temperature
    m = x.max(-1, keepdims=True)
    lse = m[..., 0] + np.log(np.exp(x - m).sum(-1))
    return np.exp(x[..., 0] - lse)


def core_scores(sc: ScoredCollection, temperature: float = CORE_TEMPERATURE, qids: Sequence[str] | None = None
                ) -> tuple[np.ndarray, int]:
    """Each head's mean CoRe score ``[layers, heads]`` over the detection samples, and their number.

    A sample is one (query, judged relevant candidate): its positive is that candidate, its hard negatives every
    candidate of the query (the first stage's top-k in the store) not judged relevant; a query with no relevant
    (or no other) candidate gives no sample. ``s(d)`` is the stored ``raw_sum``: the head's attention on d's
    tokens, mean over the query span's rows, neither calibrated by "N/A" nor masked (the authors' detector). The
    authors place each positive at 5 prompt positions (5 passes); here each query's candidates were scored once,
    in the store's prompt order: with ``--doc-order shuffle`` (a fixed random order per query) the positive sits
    at a random position in each query, so positions vary across samples instead of within them.
    """
    ids = list(qids) if qids is not None else sorted(sc.entries)
    total, n = None, 0
    for qid in ids:
        e = sc.entries[qid]
        if e.raw_sum is None:
            raise RouteheadError(f"the store {sc.settings.get('collection')}/{sc.settings.get('split')} has no raw "
                                 f"attention sums (made by an older routehead); score the collection again")
        g, _ = gains(sc, qid, e.doc_ids)
        pos, neg = np.flatnonzero(g > 0), np.flatnonzero(g <= 0)
        if not len(neg):
            continue
        for p in pos:
            c = contrastive_scores(e.raw_sum, int(p), neg, temperature)
            total = c if total is None else total + c
            n += 1
    if total is None:
        raise RouteheadError("no CoRe detection sample: no query has both a relevant and a non-relevant candidate")
    return total / n, n


def detect_core(sc: ScoredCollection, top: int = CORE_TOP, temperature: float = CORE_TEMPERATURE,
                prune: float = 0.0, max_layer: int | None = None, qids: Sequence[str] | None = None
                ) -> tuple[list[Head], np.ndarray, int]:
    """CoRe heads: the ``top`` heads by mean contrastive score (:func:`core_scores`; ties by (layer, head)) among
    the layers :func:`layer_limit` keeps; returns them best first, the whole score map and the sample count.
    Detect on a store scored with ``--doc-order shuffle`` (see :func:`core_scores`)."""
    S, n = core_scores(sc, temperature, qids)
    keep = layer_limit(S.shape[0], prune, max_layer)
    return top_heads(np.where(np.isnan(S), -np.inf, S)[:keep], top), S, n


def default_width(num_layers: int) -> int:
    """The window width when none is given: the share of the depth of the authors' one configuration (4 of
    Qwen3-0.6B's 28 layers), at least one layer."""
    return max(1, round(num_layers * 4 / 28))


def window_ndcg(sc: ScoredCollection, qid: str, widths: Sequence[int], k: int = 10) -> dict[int, np.ndarray]:
    """One stored query's nDCG@k of every window ``[s, s + w - 1]`` of each width ``w``: ``{w: [layers - w + 1]}``,
    each window scored as the live ``layers`` method scores it (the calibrated token rows of all its heads summed,
    masked, summed). The query's rows are decoded once for all widths."""
    e = sc.entries[qid]
    L, H = e.calibrated.shape[:2]
    g, ideal = gains(sc, qid, e.doc_ids)
    rows = head_rows(sc, qid, [(lay, h) for lay in range(L) for h in range(H)])
    t = tokens_of(sc, qid)
    spans = spans_of(t.counts)  # chunked stores: a document's score is its best chunk's (document_max)
    return {w: ndcg_at_k(t.document_max(np.stack([set_scores(rows[s * H:(s + w) * H], spans)
                                                  for s in range(L - w + 1)])), g, ideal, k) for w in widths}


def layer_analysis(sc: ScoredCollection, width: int, qids: Sequence[str] | None = None, k: int = 10
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Selective-ICR's per-layer analysis over the stored passes: mean nDCG@k ``[layers]`` of each layer's score
    (the live ``layers`` method with the window ``(l, l)``), and ``[layers - width + 1]`` of each window
    ``[s, s + width - 1]``'s own score (:func:`window_ndcg`)."""
    ids = list(qids) if qids is not None else sorted(sc.entries)
    L = sc.entries[ids[0]].calibrated.shape[0]
    if not 1 <= width <= L:
        raise RouteheadError(f"the window width must be 1..{L}, got {width}")
    per_query = [window_ndcg(sc, qid, (1, width), k) for qid in ids]
    return np.mean([q[1] for q in per_query], axis=0), np.mean([q[width] for q in per_query], axis=0)


def detect_window(sc: ScoredCollection, width: int | None = None, qids: Sequence[str] | None = None, k: int = 10
                  ) -> tuple[tuple[int, int], np.ndarray, np.ndarray]:
    """Selective-ICR's window ``(start, end)`` (inclusive): the ``width`` contiguous layers (default
    :func:`default_width`) whose summed score has the best mean nDCG@k on ``qids`` (ties: the shallowest, the
    cheaper pass); with the per-layer and per-window means of :func:`layer_analysis`. The authors give the window
    by hand (Qwen3-0.6B: [10, 13]) after the same per-layer analysis; choose it on train or dev queries only."""
    ids = list(qids) if qids is not None else sorted(sc.entries)
    if not ids:
        raise RouteheadError("no stored query to choose a window on")
    w = width if width is not None else default_width(sc.entries[ids[0]].calibrated.shape[0])
    per_layer, per_window = layer_analysis(sc, w, ids, k)
    start = int(np.argmax(per_window))
    return (start, start + w - 1), per_layer, per_window
