"""Where each candidate goes in the prompt: the document order is part of the method.

Attention re-rankers are position-biased (heads that attend to the start or the end of the context), so the
order in which the first stage's candidates enter the prompt changes the scores, and a first-stage order can
leak back into the re-ranking through position alone. Orders:

- ``reverse`` (the default, the published ICR and QRHead runs' ``--reverse_doc_order``): the best first-stage
  candidate last, next to the query;
- ``input``: the first-stage order, best first;
- ``shuffle``: a fixed random order per query (seeded by the query id), the content-only view: position no
  longer carries the first stage's ranking, so what a head scores here is what it reads.
- ``both`` (debiased, two passes): the mean of the ``input`` and ``reverse`` scores, so each document is scored
  once from each end of the context.
"""

from __future__ import annotations

import hashlib
import random

from routehead.settings import DEFAULT_ORDER, ORDERS


def prompt_order(n: int, order: str = DEFAULT_ORDER, key: str = "") -> list[int]:
    """Indices of the candidates (first-stage order) in prompt order."""
    if order == "input":
        return list(range(n))
    if order == "reverse":
        return list(range(n))[::-1]
    if order == "shuffle":
        seed = int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big")
        perm = list(range(n))
        random.Random(seed).shuffle(perm)
        return perm
    raise ValueError(f"unknown document order {order!r}; use one of {ORDERS}")


def passes(order: str) -> list[str]:
    """The single-order passes an order needs (``both`` = ``input`` and ``reverse``)."""
    if order == "both":
        return ["input", "reverse"]
    if order not in ORDERS:
        raise ValueError(f"unknown document order {order!r}; use one of {ORDERS}")
    return [order]
