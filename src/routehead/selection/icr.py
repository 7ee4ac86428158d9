"""ICR (Chen et al., 2024; OSU-NLP-Group/In-Context-Reranking): every head of every layer, summed."""

from __future__ import annotations

from typing import Any

import torch

from routehead.engine.aggregate import HeadSet
from routehead.selection.base import Asset, Method, Selection


class Icr(Method):
    """Every head of every layer (ICR)."""

    @classmethod
    def load(cls, identity: dict[str, Any], asset: Asset = None) -> Icr:
        return cls()

    def select(self, embedding: torch.Tensor | None = None) -> Selection:
        return Selection(HeadSet.of(None))
