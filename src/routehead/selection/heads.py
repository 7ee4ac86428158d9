"""Head-set files and model identity: a head set or router is only meaningful for the model it was made for.

Head sets are saved as JSON with the identity of the model they were detected for, and refused for another
model (:func:`check_identity`, shared with routers).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from routehead.engine.aggregate import Head
from routehead.errors import RouteheadError
from routehead.settings import ORDERS


def save_heads(path: str | Path, heads: Sequence[Head], identity: dict[str, Any], **meta: Any) -> None:
    """A head set as JSON, with the model identity it was detected for."""
    body = {"format": "routehead-heads-v2", "model": identity, "heads": [[int(a), int(b)] for a, b in heads], **meta}
    Path(path).write_text(json.dumps(body, indent=1))


def load_heads(path: str | Path, identity: dict[str, Any] | None = None) -> tuple[list[Head], dict[str, Any]]:
    """Read a head set; with ``identity``, refuse one detected for another model."""
    try:
        body = json.loads(Path(path).read_text())
        heads = [(int(a), int(b)) for a, b in body["heads"]]
        model = body["model"]
    except FileNotFoundError as exc:
        raise RouteheadError(f"head set file not found: {path}") from exc
    except (ValueError, KeyError, TypeError) as exc:
        raise RouteheadError(f"{path} is not a routehead head-set file ({type(exc).__name__}: {exc})") from exc
    if not heads:
        raise RouteheadError(f"{path} lists no heads")
    if body.get("format") != "routehead-heads-v2":
        raise RouteheadError(f"{path} was detected by an older routehead (per-head masking, another prompt); "
                             f"detect the heads again (routehead detect) or pass them as a list")
    if identity is not None:
        check_identity(model, identity, str(path))
    return heads, body


def file_serving_order(body: dict[str, Any], method: str, path: str | Path) -> str | None:
    """The prompt order a head-set or window file says ``method`` is served in (its ``serving_order`` map,
    written by bench/serving_order.py from held-out train queries), or None where it says none. One file can serve
    two methods (``static`` and ``single`` read the same heads), so the map is keyed by method name."""
    order = (body.get("serving_order") or {}).get(method)
    if order is not None and order not in ORDERS:
        raise RouteheadError(f"{path}: serving_order for {method!r} is {order!r}, not one of {list(ORDERS)}")
    return order


def record_serving_order(path: str | Path, method: str, order: str) -> None:
    """Write ``method``'s serving order into a head-set or window file (the heads or window unchanged)."""
    body = json.loads(Path(path).read_text())
    body["serving_order"] = {**(body.get("serving_order") or {}), method: order}
    file_serving_order(body, method, path)  # refuse an order that is not one
    Path(path).write_text(json.dumps(body, indent=1))


def check_identity(saved: dict[str, Any], current: dict[str, Any], what: str) -> None:
    """A head set or router is only meaningful for the model (and shape) it was made with."""
    keys = ("model", "num_layers", "num_heads")
    diff = [f"{k}: file has {saved.get(k)!r}, model has {current.get(k)!r}"
            for k in keys if saved.get(k) != current.get(k)]
    if diff:
        raise RouteheadError(f"{what} was made for another model ({'; '.join(diff)})")
