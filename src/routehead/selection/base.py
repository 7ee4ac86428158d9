"""What a method is: a selection of heads over the shared forward pass, one query at a time.

Every attention re-ranker here reads the same pass (documents, late instruction, query; calibrated against the
content-free query) and differs only in which heads it sums, with which weights, and whether the first-stage
score joins in. A :class:`Method` says what it needs (nothing, a head set, or a router and the query's
embedding), loads it for a model, and turns a query into a :class:`Selection`. The live pass
(:class:`routehead.api.Reranker`) and the stored passes (:func:`routehead.offline.views.selection_scores`)
aggregate a selection the same way (:mod:`routehead.engine.aggregate`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from routehead.engine.aggregate import Head, HeadSet
from routehead.engine.scorer import PassRouting

Asset = str | Path | Sequence[Head] | None  # what a method loads: a path, a shipped variant name, a head list


@dataclass(frozen=True)
class Selection:
    """One query's selection: heads summed (``heads.heads`` None: every head) with their weights, and the
    first-stage score's weight (0: not used)."""

    heads: HeadSet
    first_stage_weight: float = 0.0

    @property
    def deepest_layer(self) -> int | None:
        """The deepest layer read (the pass stops after it); None when every layer is read."""
        return None if self.heads.heads is None else max((a for a, _ in self.heads.heads), default=-1)


class Method:
    """A head selection. Subclasses implement :meth:`load` and :meth:`select`; :attr:`embedding` is the
    (layer, pooling) of the query embedding :meth:`select` reads, or None when it reads none. The registry
    (:mod:`routehead.selection.registry`) sets :attr:`name` and :attr:`needs` when it loads the class."""

    name: ClassVar[str] = ""
    needs: ClassVar[str] = ""  # nothing | heads | router
    serving_order: str | None = None  # the prompt order it is best served in, where its asset says (None: default)

    def __init__(self, prompt: dict[str, Any] | None = None) -> None:
        self.prompt = dict(prompt or {})  # prompt settings the heads were chosen under ({}: none)

    @classmethod
    def load(cls, identity: dict[str, Any], asset: Asset = None) -> Method:
        """This method for the model of ``identity`` (``identity["model"]`` names shipped assets)."""
        raise NotImplementedError

    @property
    def embedding(self) -> tuple[int, str] | None:
        return None

    def select(self, embedding: torch.Tensor | None = None) -> Selection:
        raise NotImplementedError

    def pass_routing(self) -> PassRouting | None:
        """How to route inside the re-ranking pass (a method that reads the query in the prompt), or None."""
        return None

    def info(self) -> dict[str, Any]:
        """What a caller may want to show about the loaded method (heads, router settings)."""
        return {}
