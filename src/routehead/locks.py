"""One lock per object, held in a weak map (nothing outlives its object): shared by the async API (one model
call at a time per reranker) and the prompt builder (one encode at a time per tokenizer)."""

from __future__ import annotations

import threading
import weakref
from typing import Any

_locks: weakref.WeakKeyDictionary[Any, threading.Lock] = weakref.WeakKeyDictionary()
_guard = threading.Lock()


def lock_for(obj: Any) -> threading.Lock:
    """The one lock of ``obj``, made on first use."""
    with _guard:
        lock = _locks.get(obj)
        if lock is None:
            lock = _locks[obj] = threading.Lock()
        return lock
