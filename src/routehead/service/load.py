"""What the queue will cost: the measured tokens/s of a replica, and the wait it gives a request.

Why tokens: a request's cost is its prompt tokens (the reranker's own count, ``RerankerLike.prompt_tokens``),
and requests differ in size by orders of magnitude, so a count of queued requests says little about the wait.
The rate is measured, not configured: each model call that served requests gives ``tokens / seconds`` (with
batching on, the rate of the batches the load actually forms), and an exponentially weighted mean follows the
recent calls.  The warm-up is not measured (its first call pays for start-up).

A request is then shed (429 with ``Retry-After``) when the tokens ahead of it, plus its own, at the measured
rate of all replicas, would not be answered within :data:`ADMIT_SHARE` of its deadline: a 429 at once instead
of a 504 after ``request_timeout_s``.  A request is never shed when nothing is ahead of it (retrying could not
help: it runs, and the deadline decides).  Until the first measurement only the request count bounds admission.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass

ALPHA = 0.3  # weight of the newest model call in the mean rate
# Admit only what the estimate puts within this share of the deadline: passes vary around the mean rate (on the
# busy CPU box p99 19.9 s under a 20 s deadline admitted at 100 % gave 3 504s in 672 answers).
ADMIT_SHARE = 0.85


class Throughput:
    """Tokens/s of one replica: an exponentially weighted mean over the model calls (thread-safe)."""

    def __init__(self, alpha: float = ALPHA) -> None:
        self.alpha = alpha
        self._rate: float | None = None
        self._lock = threading.Lock()

    @property
    def rate(self) -> float | None:
        """Tokens/s, or None before the first measured call."""
        return self._rate

    def observe(self, tokens: int, seconds: float) -> None:
        if tokens <= 0 or seconds <= 0 or not math.isfinite(seconds):
            return
        measured = tokens / seconds
        with self._lock:
            self._rate = measured if self._rate is None else (1 - self.alpha) * self._rate + self.alpha * measured


@dataclass(frozen=True)
class Wait:
    """The estimated wait of a request: ``ahead_s`` for the work before it, ``total_s`` until it is answered."""

    ahead_s: float
    total_s: float

    def misses(self, deadline_s: float | None) -> bool:
        """Whether it would miss ``deadline_s`` (with :data:`ADMIT_SHARE`'s margin) because of the work ahead
        (never when nothing is ahead)."""
        return deadline_s is not None and self.ahead_s > 0 and self.total_s > ADMIT_SHARE * deadline_s

    def retry_after(self, deadline_s: float) -> int:
        """Seconds until enough of the work ahead is done for the request to fit (at least 1)."""
        return max(1, math.ceil(min(self.total_s - ADMIT_SHARE * deadline_s, self.ahead_s)))


def estimate(ahead_tokens: float, own_tokens: int, rate: float | None, replicas: int) -> Wait | None:
    """The wait at ``rate`` tokens/s per replica over ``replicas`` replicas; None while no rate is measured."""
    if rate is None or rate <= 0:
        return None
    capacity = rate * max(1, replicas)
    return Wait(ahead_s=ahead_tokens / capacity, total_s=(ahead_tokens + own_tokens) / capacity)
