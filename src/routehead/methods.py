"""The re-ranking methods (head selections over the same forward pass) and the default pairing of method and
prompt order, in one place: ``Reranker``, ``routehead rerank`` and ``routehead serve`` use it unless told.

- ``route``: RouteHead, a router picks each query's heads;
- ``static``: a fixed head set (QRHead);
- ``icr``: every head (ICR).

The default method and order were chosen together on scifact train/dev, never on a test split
(``bench/choose_default.py``; the table is in BENCHMARKS.md).
"""

from __future__ import annotations

METHODS = ("route", "static", "icr")
DEFAULT_METHOD = "route"
DEFAULT_ORDER = "reverse"
