"""CoRe heads (Tran et al., 2025, arXiv 2510.02219; linhhtran/CoRe-Reranking): a head set detected by a contrastive
score, read at inference exactly as ICR reads every head.

Inference (the authors' ``reranker_calib.py``): the selected heads' attention rows, query minus "N/A", summed over
the heads per token with equal weights; per document, tokens not above ``mean - 2 std`` masked; the rest summed.
That is routehead's one aggregation (:mod:`routehead.engine.aggregate`) over the CoRe head set, so ``core`` is
``static`` with its own asset, ``heads-<model>-core.json``, made by ``routehead detect --rule core``
(:func:`routehead.training.detect.detect_core`: each head's contrastive score on the uncalibrated, unmasked
attention mass, top-k). The pass stops after the deepest selected head's layer, as with any head set: with a
layer-pruned detection (``--prune``) that is at most CoRe's ``floor(L (1 - p)) - 1``.
"""

from __future__ import annotations

from pathlib import Path

from routehead.assets import default_core_heads_path
from routehead.selection.static import Static


class Core(Static):
    """The CoRe head set, summed (equal weights) before ICR's calibration and mask."""

    rule = "core"

    @staticmethod
    def shipped(model: str) -> Path:
        return default_core_heads_path(model)
