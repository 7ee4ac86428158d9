"""Head detection on training queries: which heads rank the judged documents best alone.

QRHead's rule (princeton-pli/QRHead): each head's calibrated, masked document scores alone; its mean nDCG@k over
the detection queries; the top heads kept. Detection reads the stored passes (:mod:`routehead.offline.views`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from routehead.engine.aggregate import Head
from routehead.errors import RouteheadError
from routehead.metrics import ndcg_at_k
from routehead.offline.collect import ScoredCollection
from routehead.offline.views import gains


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
