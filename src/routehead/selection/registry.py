"""The method registry: every head selection routehead runs, by name, in one place.

``Reranker``, the CLI, the service, the evaluation runs and the bench scripts all take methods from here; a new
method is one file under :mod:`routehead.selection` and one entry in :data:`METHODS`. The registry is
torch-free (a method's class is imported when it is loaded), so the CLI can offer its names without loading
torch.

The default method and order were chosen together on scifact train/dev, never on a test split
(``bench/choose_default.py``, the table is in BENCHMARKS.md): on 100 dev queries with the default model, ICR in
the published (reversed) order scored nDCG@10 0.658, the best of every method under every order (RouteHead's
best: 0.624 reversed, 0.582 shuffled; BM25 0.661). ICR also needs no trained asset, so the default works with
any causal LM; ``route`` and ``static`` are one argument away.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from routehead.errors import RouteheadError

if TYPE_CHECKING:
    from routehead.selection.base import Asset, Method

NEEDS = ("nothing", "heads", "window", "router")  # a window is passed as ``heads=`` (a window file or (start, end))


@dataclass(frozen=True)
class MethodSpec:
    """A registered method: its name, what it needs (nothing, a head set, a layer window, a router), where its
    class lives."""

    name: str
    needs: str
    target: str  # "module:Class"
    summary: str

    def load_class(self) -> type[Method]:
        module, cls_name = self.target.split(":")
        cls = getattr(importlib.import_module(module), cls_name)
        cls.name, cls.needs = self.name, self.needs  # the registry names the class: one place for both
        return cls


METHODS: dict[str, MethodSpec] = {s.name: s for s in (
    MethodSpec("route", "router", "routehead.selection.route:Route", "per-query heads from a router (RouteHead)"),
    MethodSpec("static", "heads", "routehead.selection.static:Static", "a detected head set (QRHead)"),
    MethodSpec("single", "heads", "routehead.selection.static:Single", "the best detected head alone"),
    MethodSpec("icr", "nothing", "routehead.selection.icr:Icr", "every head (ICR)"),
    MethodSpec("core", "heads", "routehead.selection.core:Core", "a contrastively detected head set (CoRe heads)"),
    MethodSpec("layers", "window", "routehead.selection.layers:Layers", "every head of a layer window (Selective-ICR)"),
)}
DEFAULT_METHOD = "icr"


def resolve_method(method: str | None, router: object = None, heads: object = None) -> str:
    """The method a caller means: the one named; else ``route`` when a router is given, ``static`` when heads
    are, and the default otherwise (so ``Reranker(router=PATH)`` is RouteHead, as anyone would expect)."""
    if method is not None:
        return method
    for given, needs in ((router, "router"), (heads, "heads")):
        if given is not None:
            return next(n for n, s in METHODS.items() if s.needs == needs)
    return DEFAULT_METHOD


def method_spec(name: str) -> MethodSpec:
    try:
        return METHODS[name]
    except KeyError:
        raise RouteheadError(f"unknown method {name!r}; use one of {tuple(METHODS)}") from None


def load_method(name: str | None, identity: dict[str, Any], router: Asset = None, heads: Asset = None) -> Method:
    """Method ``name`` (resolved as :func:`resolve_method`) loaded for the model of ``identity``: a router-based
    method takes ``router``, a head-set method ``heads``, a window method (``layers``) its window through
    ``heads`` too (a window file or a ``(start, end)`` pair), and each falls back to the asset shipped for the
    model."""
    spec = method_spec(resolve_method(name, router, heads))
    asset = {"router": router, "heads": heads, "window": heads}.get(spec.needs)
    return spec.load_class().load(identity, asset)
