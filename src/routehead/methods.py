"""The re-ranking methods (head selections over the same forward pass) and the default pairing of method and
prompt order, in one place: ``Reranker``, ``routehead rerank`` and ``routehead serve`` use it unless told.

- ``route``: RouteHead, a router picks each query's heads;
- ``static``: a fixed head set (QRHead);
- ``icr``: every head (ICR).

The default method and order were chosen together on scifact train/dev, never on a test split
(``bench/choose_default.py``, the table is in BENCHMARKS.md): on 100 dev queries with the default model, ICR in
the published (reversed) order scored nDCG@10 0.658, the best of every method under every order (RouteHead's
best: 0.624 reversed, 0.582 shuffled; BM25 0.661). ICR also needs no trained asset, so the default works with
any causal LM; ``route`` and ``static`` are one argument away.
"""

from __future__ import annotations

METHODS = ("route", "static", "icr")
DEFAULT_METHOD = "icr"
DEFAULT_ORDER = "reverse"


def resolve_method(method: str | None, router: object = None, heads: object = None) -> str:
    """The method a caller means: the one named; else ``route`` when a router is given, ``static`` when heads
    are, and the default otherwise (so ``Reranker(router=PATH)`` is RouteHead, as anyone would expect)."""
    if method is not None:
        return method
    return "route" if router is not None else "static" if heads is not None else DEFAULT_METHOD
