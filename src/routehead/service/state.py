"""What the endpoints share (:class:`ServiceState`): the replicas, the batcher, readiness, calibration, metrics.

Readiness: ``loading`` (a factory is building the replicas in a background thread), ``ready`` (every replica
ran the warm-up request), ``failed`` (loading or warm-up raised) and ``draining`` (SIGTERM: no new work).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from routehead.calibration import Calibration, calibration_for
from routehead.service.batching import Batcher, Work
from routehead.service.config import Limits, ServiceSettings
from routehead.service.metrics import Metrics
from routehead.service.protocol import RerankerLike, is_reranker
from routehead.service.tokens import Truncator

logger = logging.getLogger("routehead.service")

WARMUP = Work(query="warm up", documents=["warm up the model"], tokens=64)

Source = RerankerLike | Sequence[RerankerLike] | Callable[[], Any]


def model_name(info: dict[str, Any]) -> str | None:
    """The served model's name in a reranker's ``info()``."""
    for key in ("model", "model_name", "model_id", "name"):
        value = info.get(key)
        if isinstance(value, str) and value:
            return value
    return None


def _replicas(made: Any) -> list[RerankerLike]:
    return list(made) if isinstance(made, (list, tuple)) else [made]


class ServiceState:
    """The service's shared state; ``source`` is a reranker, a list of replicas, or a factory of either."""

    def __init__(self, source: Source, limits: Limits, settings: ServiceSettings, calibration: Calibration | None,
                 names: Sequence[str] | None) -> None:
        self.limits = limits
        self.settings = settings
        self.metrics = Metrics()
        self.names = names
        self.given_calibration = calibration
        self.status = "loading"
        self.message: str | None = None
        self.batcher: Batcher | None = None
        self.info: dict[str, Any] = {}
        self.model_name = "unknown"
        self.calibration: Calibration = calibration or calibration_for({})
        self.truncate: Truncator | None = None
        self.created = int(time.time())
        self.replicas: list[RerankerLike] = []
        self.factory: Callable[[], Any] | None = None
        self._draining = False
        self.shutdown_by: float | None = None  # perf_counter() by which shutdown ends (set by the draining server)
        if is_reranker(source) or (isinstance(source, (list, tuple)) and source and is_reranker(source[0])):
            self._set_replicas(_replicas(source))
        elif callable(source):
            self.factory = source
        else:
            raise TypeError("create_app needs a reranker (rerank, rerank_many, info, prompt_tokens: "
                            "routehead.service.protocol.RerankerLike), a list of replicas, or a factory returning them")

    def _set_replicas(self, replicas: list[RerankerLike]) -> None:
        # info() is read once: /health never waits for the model, and a broken info() fails at start-up.
        self.info = json.loads(json.dumps(dict(replicas[0].info()), default=str))
        self.model_name = model_name(self.info) or "unknown"
        self.calibration = self.given_calibration or calibration_for(self.info)
        self.truncate = Truncator(replicas[0])
        self.replicas = replicas
        self.batcher = Batcher(replicas, self.settings, metrics=self.metrics, names=self.names)

    @property
    def ready(self) -> bool:
        return self.status == "ready"

    @property
    def counter(self) -> RerankerLike:
        """The replica that counts prompt tokens (all replicas serve the same model)."""
        return self.replicas[0]

    def _mark(self, status: str, message: str | None = None) -> None:
        self.status, self.message = status, message
        self.metrics.ready.set(1 if status == "ready" else 0)
        logger.info("service %s%s", status, f": {message}" if message else "")

    def start_workers(self, done: threading.Event | None = None) -> None:
        """Start the batcher's workers; readiness turns ``ready`` once each replica ran the warm-up (and the token
        count and truncation did: their first call sets them up) or ``failed`` if one raised."""
        assert self.batcher is not None

        def ready() -> None:
            try:
                if self.settings.warmup:
                    self.counter.prompt_tokens(WARMUP.query, WARMUP.documents)
                    assert self.truncate is not None
                    self.truncate(WARMUP.documents, 1)
            except Exception as exc:
                logger.exception("warm-up of the token count failed")
                failed(exc)
                return
            if self.status == "loading":
                self._mark("ready")
            if done is not None:
                done.set()

        def failed(exc: BaseException) -> None:
            self._mark("failed", f"warm-up failed: {type(exc).__name__}: {exc}")
            if done is not None:
                done.set()

        self.batcher.start(warmup=WARMUP if self.settings.warmup else None, on_ready=ready, on_error=failed)

    def load_in_background(self) -> None:
        """Call the factory in a thread (the HTTP server answers meanwhile), then start the workers."""
        assert self.factory is not None
        factory = self.factory

        def load() -> None:
            try:
                self._set_replicas(_replicas(factory()))
            except BaseException as exc:
                logger.exception("loading the model failed")
                self._mark("failed", f"loading the model failed: {type(exc).__name__}: {exc}")
                return
            self.start_workers()

        threading.Thread(target=load, name="routehead-load", daemon=True).start()

    def drain(self, deadline: float | None = None) -> None:
        """Stop admitting work (readiness goes to 503); in-flight requests keep running and, given ``deadline``
        (a ``time.perf_counter()`` value), are each answered by then (:meth:`Batcher.drain`).  Call on the event
        loop's thread."""
        if self.status in ("ready", "loading"):
            self._mark("draining")
        if deadline is not None and self.batcher is not None and not self._draining:
            self._draining = True
            self.batcher.drain(deadline)
