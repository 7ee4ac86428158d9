"""A fixed head set (QRHead, Zhang et al., 2025; princeton-pli/QRHead): the heads detected on training queries,
summed; and ``single``, its best head alone."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch

from routehead.assets import default_heads_path
from routehead.engine.aggregate import Head, HeadSet
from routehead.errors import RouteheadError
from routehead.selection.base import Asset, Method, Selection
from routehead.selection.heads import file_serving_order, load_heads


class Static(Method):
    """A detected head set (QRHead), summed."""

    rule: ClassVar[str] = "qrhead"  # the ``routehead detect --rule`` that makes the shipped asset

    def __init__(self, heads: Sequence[Head], prompt: dict[str, Any] | None = None,
                 detection: dict[str, Any] | None = None) -> None:
        super().__init__(prompt)
        if not heads:
            raise RouteheadError(f"method {self.name!r} needs at least one head")
        self.heads = [(int(a), int(b)) for a, b in heads]
        self.detection = dict(detection or {})  # how a head file's heads were detected ({}: not said)

    @staticmethod
    def shipped(model: str) -> Path:
        """The head set shipped for ``model``."""
        return default_heads_path(model)

    @classmethod
    def load(cls, identity: dict[str, Any], asset: Asset = None) -> Static:
        """``asset``: a head-set JSON, a list of (layer, head), or None for the set shipped for the model."""
        if asset is None or isinstance(asset, (str, Path)):
            path = Path(asset) if asset is not None else cls.shipped(identity["model"])
            if asset is None and not path.is_file():
                raise RouteheadError(f"no {cls.rule} head set shipped for model {identity['model']!r}; detect one "
                                     f"(routehead detect --rule {cls.rule}) and pass heads=PATH")
            heads, body = load_heads(path, identity)
            method = cls(cls.chosen(heads), body.get("prompt", {}), body.get("detection"))
            method.serving_order = file_serving_order(body, cls.name, path)
            return method
        return cls(cls.chosen([(int(a), int(b)) for a, b in asset]))  # the caller's order: best first

    @staticmethod
    def chosen(heads: list[Head]) -> list[Head]:
        return heads

    def select(self, embedding: torch.Tensor | None = None) -> Selection:
        return Selection(HeadSet.of(self.heads))

    def info(self) -> dict[str, Any]:
        out: dict[str, Any] = {"heads": [list(h) for h in self.heads]}
        if self.detection:
            out["detection"] = self.detection
        return out


class Single(Static):
    """The best head of a detected set alone (a head file lists its heads best first)."""


    @staticmethod
    def chosen(heads: list[Head]) -> list[Head]:
        return heads[:1]
