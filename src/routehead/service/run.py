"""Running the service: uvicorn with the connection limits, header timeout, SIGTERM drain and JSON logs.

Why a ``uvicorn.Server`` subclass: uvicorn alone, on SIGTERM, waits up to its graceful timeout for open
requests, then cancels them (each gets a plain-text 500 and a traceback in the log) and only then runs the app's
shutdown, which waited again for the running batches: twice the grace.  The draining server, from the signal on
(:func:`drain_deadlines`): readiness turns 503 and new requests get a JSON 503 (so a load balancer stops
sending); the queue keeps being served, and every admitted request is answered before ``answer_by`` (its
ranking, or 503 with Retry-After where the queue would not reach it in time:
:meth:`~routehead.service.batching.Batcher.drain`); uvicorn closes the connections as their answers complete;
the app's shutdown waits for the running batches only until ``exit_by``, and the process exits within the grace.
A model call whose requests all got that 503 at ``answer_by`` is awaited by nobody, so it stops at its next layer
boundary (the batcher's ``should_stop``, where the reranker takes it): the replica is idle by ``exit_by`` unless a
single layer outlasts the gap between the two deadlines (two fifteenths of the grace, at most 1 s); even then the
process exits on time, as the shutdown stops waiting at ``exit_by`` and the workers are daemon threads.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import sys
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from routehead.calibration import Calibration
from routehead.service.config import DEFAULT_HOST, DEFAULT_PORT, Limits, ServiceSettings
from routehead.service.http import header_timeout_protocol

if TYPE_CHECKING:
    from routehead.service.state import Source

logger = logging.getLogger("routehead.server")

_STANDARD_ATTRS = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, and any ``extra=`` fields of the record."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {"time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"), "level": record.levelname,
                               "logger": record.name, "message": record.getMessage()}
        out.update({k: v for k, v in record.__dict__.items() if k not in _STANDARD_ATTRS and not k.startswith("_")})
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str, ensure_ascii=False)


def configure_logging(level: str = "info", json_logs: bool = False) -> None:
    """Log to stderr: plain lines, or JSON lines with ``json_logs`` (uvicorn's own loggers included)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if json_logs else logging.Formatter("%(asctime)s %(levelname)s "
                                                                            "%(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def drain_deadlines(signalled: float, grace_s: float) -> tuple[float, float]:
    """``(answer_by, exit_by)`` for a SIGTERM at ``signalled`` (``time.perf_counter()``) and ``grace_s``: every
    request is answered by ``answer_by``, leaving time (a fifth of the grace, at most 1.5 s) to send the answers,
    close the connections and stop the workers by ``exit_by``, itself a little before the grace ends."""
    margin = min(1.5, 0.2 * grace_s)
    return signalled + grace_s - margin, signalled + grace_s - margin / 3


def build_server(app: Any, host: str, port: int, settings: ServiceSettings, log_level: str = "info",
                 configure_logs: bool = True) -> Any:
    """A ``uvicorn.Server`` for ``app`` with the service's timeouts and limits, draining on SIGTERM."""
    import uvicorn

    state = app.state.service

    class DrainingServer(uvicorn.Server):
        signalled: float | None = None

        def handle_exit(self, sig: int, frame: Any) -> None:
            # a signal handler: note the time only (taking a lock here could deadlock the interrupted loop)
            if self.signalled is None:
                self.signalled = time.perf_counter()
            super().handle_exit(sig, frame)

        async def shutdown(self, sockets: Any = None) -> None:
            answer_by, exit_by = drain_deadlines(self.signalled or time.perf_counter(), settings.graceful_shutdown_s)
            state.shutdown_by = exit_by
            state.drain(answer_by)
            await super().shutdown(sockets)

    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="on",
                            http=header_timeout_protocol(settings.header_timeout_s),
                            timeout_graceful_shutdown=settings.graceful_shutdown_s,  # type: ignore[arg-type]
                            limit_concurrency=settings.max_connections, timeout_keep_alive=5,
                            log_config=None if not configure_logs else uvicorn.config.LOGGING_CONFIG)
    return DrainingServer(config)


def _run_server(server: Any) -> None:
    server.run()


def serve(reranker_factory_or_reranker: Source, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT,
          limits: Limits | None = None, *, settings: ServiceSettings | None = None, log_level: str = "info",
          json_logs: bool = False, calibration: Calibration | None = None,
          replica_names: Sequence[str] | None = None) -> None:
    """Serve a reranker (a :class:`~routehead.service.protocol.RerankerLike`), replicas, or a factory of them with
    uvicorn until SIGTERM/SIGINT.

    A factory is called after the socket opens: ``/health`` answers at once and ``/ready`` turns 200 once
    the model is loaded and warmed up.  Binds to 127.0.0.1 by default: the service has no authentication,
    and a model on a public port is an open compute endpoint; other addresses are logged as a warning.
    """
    from routehead.service.app import create_app

    settings = settings or ServiceSettings()
    if json_logs:
        configure_logging(log_level, json_logs=True)
    if not is_loopback(host):
        logger.warning("binding the re-rank service to %s: it has no authentication; anyone who can reach this "
                       "address can use the model", host)
    app = create_app(reranker_factory_or_reranker, limits, settings, calibration=calibration,
                     replica_names=replica_names)
    _run_server(build_server(app, host, port, settings, log_level, configure_logs=not json_logs))
