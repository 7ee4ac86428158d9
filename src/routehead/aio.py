"""Async wrappers that share one model safely: ``await arerank(reranker, ...)`` from any event loop.

Why a lock per reranker and a worker thread: a PyTorch model is not thread-safe and a forward pass blocks, so
each call runs in a thread (the event loop stays free) under the reranker's own lock (concurrent awaits on one
model queue up instead of entering it together).  The lock lives in a weak map, not on the object, so any
reranker works and nothing outlives it.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence
from typing import Any

from routehead.locks import lock_for


def model_lock(reranker: Any) -> threading.Lock:
    """The one lock every async call on ``reranker`` takes."""
    return lock_for(reranker)


def _locked(reranker: Any, method: str, args: tuple, kwargs: dict) -> Any:
    with model_lock(reranker):
        return getattr(reranker, method)(*args, **kwargs)


async def arerank(reranker: Any, query: str, documents: Sequence[str], **kwargs: Any) -> Any:
    """``reranker.rerank(query, documents, **kwargs)`` in a worker thread, one call at a time per model."""
    return await asyncio.to_thread(_locked, reranker, "rerank", (query, documents), kwargs)


async def arank(reranker: Any, query: str, documents: Sequence[str], **kwargs: Any) -> Any:
    """``reranker.rank(query, documents, **kwargs)`` in a worker thread, one call at a time per model."""
    return await asyncio.to_thread(_locked, reranker, "rank", (query, documents), kwargs)
