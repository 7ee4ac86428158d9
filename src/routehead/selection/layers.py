"""Selective-ICR (arXiv 2602.22591; ielab/Selective-ICR): every head of a window of layers ``[start, end]``.

The authors' code is ICR with two knobs, ``--aggregation_start_layer s`` and ``--max_layer e``: the query's and the
"N/A" prompt's attention rows are summed over all heads of layers ``s..e`` per token, then calibrated, masked
(``mean - 2 std`` per document) and summed, as ICR does over every layer; the pass exits after layer ``e``. Here
that is the head set of the window's layers, aggregated in routehead's one place (:mod:`routehead.engine.aggregate`);
the engine stops the pass after the deepest layer of a head set, i.e. after ``e``.

The window comes from a window file (``layers-<model>.json``, shipped or made by ``routehead detect --rule layers``:
:func:`routehead.training.detect.detect_window`) or is given as a ``(start, end)`` pair, both inclusive, 0-indexed.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from routehead.assets import default_window_path
from routehead.engine.aggregate import Head, HeadSet
from routehead.errors import RouteheadError
from routehead.selection.base import Asset, Method, Selection
from routehead.selection.heads import check_identity, file_serving_order

WINDOW_FORMAT = "routehead-window-v1"
Window = tuple[int, int]


def save_window(path: str | Path, window: Window, identity: dict[str, Any], **meta: Any) -> None:
    """A layer window as JSON, with the model identity it was chosen for."""
    start, end = check_window(window, identity.get("num_layers"))
    body = {"format": WINDOW_FORMAT, "model": identity, "window": [start, end], **meta}
    Path(path).write_text(json.dumps(body, indent=1))


def load_window(path: str | Path, identity: dict[str, Any] | None = None) -> tuple[Window, dict[str, Any]]:
    """Read a window file; with ``identity``, refuse one chosen for another model."""
    try:
        body = json.loads(Path(path).read_text())
        start, end = (int(x) for x in body["window"])
        model = body["model"]
    except FileNotFoundError as exc:
        raise RouteheadError(f"window file not found: {path}") from exc
    except (ValueError, KeyError, TypeError) as exc:
        raise RouteheadError(f"{path} is not a routehead window file ({type(exc).__name__}: {exc})") from exc
    if body.get("format") != WINDOW_FORMAT:
        raise RouteheadError(f"{path} is not a routehead window file (format {body.get('format')!r}); make one "
                             f"with routehead detect --rule layers")
    if identity is not None:
        check_identity(model, identity, str(path))
    return check_window((start, end), (identity or model).get("num_layers")), body


def check_window(window: Sequence[int], num_layers: int | None) -> Window:
    """``(start, end)`` as ints, ``0 <= start <= end`` (``< num_layers`` when known)."""
    try:
        start, end = (int(x) for x in window)
    except (TypeError, ValueError):
        raise RouteheadError(f"a layer window is a (start, end) pair of layer indices, got {window!r}") from None
    top = "" if num_layers is None else f" < {num_layers}"
    if not 0 <= start <= end or (num_layers is not None and end >= num_layers):
        raise RouteheadError(f"layer window ({start}, {end}) needs 0 <= start <= end{top}")
    return start, end


class Layers(Method):
    """Every head of the layers ``start..end`` (Selective-ICR), summed before ICR's calibration and mask."""

    def __init__(self, window: Window, num_heads: int, prompt: dict[str, Any] | None = None,
                 detection: dict[str, Any] | None = None) -> None:
        super().__init__(prompt)
        self.window = window
        self.heads: list[Head] = [(lay, h) for lay in range(window[0], window[1] + 1) for h in range(num_heads)]
        self.detection = dict(detection or {})  # how a window file's window was chosen ({}: not said)

    @classmethod
    def load(cls, identity: dict[str, Any], asset: Asset = None) -> Layers:
        """``asset``: a window JSON, a ``(start, end)`` pair (or the text ``"start,end"``, as the CLI's ``--heads``
        passes it), or None for the window shipped for the model."""
        num_layers, num_heads = identity.get("num_layers"), identity.get("num_heads")
        if num_heads is None:
            raise RouteheadError("method 'layers' needs the model's head count (identity['num_heads'])")
        pair = re.fullmatch(r"\s*(\d+)\s*,\s*(\d+)\s*", asset) if isinstance(asset, str) else None
        if pair is not None and not Path(asset).exists():
            asset = (int(pair[1]), int(pair[2]))
        if asset is None or isinstance(asset, (str, Path)):
            path = Path(asset) if asset is not None else default_window_path(identity["model"])
            if asset is None and not path.is_file():
                raise RouteheadError(f"no layer window shipped for model {identity['model']!r}; choose one "
                                     f"(routehead detect --rule layers) and pass heads=PATH or heads=(start, end)")
            window, body = load_window(path, identity)
            method = cls(window, int(num_heads), body.get("prompt", {}), body.get("detection"))
            method.serving_order = file_serving_order(body, cls.name, path)
            return method
        if len(asset) != 2 or not all(hasattr(x, "__index__") for x in asset):
            raise RouteheadError(f"method 'layers' takes a window: a window JSON or a (start, end) pair of layers, "
                                 f"not {asset!r}")
        return cls(check_window(asset, num_layers), int(num_heads))

    def select(self, embedding: torch.Tensor | None = None) -> Selection:
        return Selection(HeadSet.of(self.heads))

    def info(self) -> dict[str, Any]:
        out: dict[str, Any] = {"window": list(self.window), "heads": [list(h) for h in self.heads]}
        if self.detection:
            out["detection"] = self.detection
        return out
