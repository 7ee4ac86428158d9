"""``routehead serve``: the HTTP service (:mod:`routehead.service`).

Every service default is read from :class:`~routehead.service.config.Limits` and
:class:`~routehead.service.config.ServiceSettings` (their one home); the options only name them.
"""

from __future__ import annotations

import argparse
from dataclasses import fields
from typing import Any

from routehead.cli.options import add_field, model_args
from routehead.cli.rerank import method_args
from routehead.service.config import DEFAULT_HOST, DEFAULT_PORT, Limits, ServiceSettings, batching_for

LIMITS = ("max_documents", "max_document_chars", "max_request_tokens")
SETTINGS = ("max_batch_tokens", "max_batch_requests", "max_concurrent_requests", "max_connections")
# options named by their unit-less flag (--request-timeout, not --request-timeout-s): (flag, field)
SECONDS = (("request_timeout", "request_timeout_s"), ("graceful_shutdown", "graceful_shutdown_s"))


def _seconds(p: argparse.ArgumentParser, flag: str, name: str) -> None:
    """``--flag`` for the ``ServiceSettings`` field ``name`` (seconds), as :func:`add_field` builds options."""
    f = next(f for f in fields(ServiceSettings) if f.name == name)
    p.add_argument("--" + flag.replace("_", "-"), type=float, default=f.default,
                   help=f"{f.metadata['help']} (default {f.default})")


def resolve_devices(devices: list[str | None]) -> list[str]:
    """Each device, ``None`` (the default device) as ``cuda`` where torch sees a GPU, else ``cpu``."""
    if all(d is not None for d in devices):
        return [d for d in devices if d is not None]
    import torch

    default = "cuda" if torch.cuda.is_available() else "cpu"
    return [d or default for d in devices]


def serve(args: argparse.Namespace) -> None:
    from routehead.api import Reranker
    from routehead.service.run import serve

    devices = [d.strip() for d in args.devices.split(",") if d.strip()] if args.devices else [args.device]

    def factory() -> list[Reranker]:
        """One replica per device, all behind the same queue (loaded after the socket opens: /ready is 503)."""
        return [Reranker(model=args.model, method=args.method, router=args.router, heads=args.heads,
                         device=device, dtype=args.dtype, trust_remote_code=args.trust_remote_code,
                         doc_order=args.doc_order, layout=args.layout, max_chunks_per_doc=args.max_chunks_per_doc)
                for device in devices]

    mode = args.batching if not args.no_batching else "off"
    batching = batching_for(mode, resolve_devices(devices) if mode == "auto" else [])
    settings = ServiceSettings(**{name: getattr(args, name) for name in SETTINGS},
                               **{name: getattr(args, flag) for flag, name in SECONDS}, batching=batching)
    serve(factory, host=args.host, port=args.port, settings=settings, json_logs=args.json_logs,
          replica_names=[d or "default" for d in devices],
          limits=Limits(**{name: getattr(args, name) for name in LIMITS}))


def register(sub: Any) -> None:
    p = sub.add_parser("serve", help="HTTP re-rank service (Cohere /v1|v2/rerank, TEI /rerank, /health, /ready, "
                       "/metrics)")
    p.add_argument("--host", default=DEFAULT_HOST)
    p.add_argument("--port", type=int, default=DEFAULT_PORT)
    method_args(p)
    for name in LIMITS:
        add_field(p, Limits, name)
    p.add_argument("--devices", default=None, help="comma-separated devices, one model replica each behind one "
                   "queue: cuda:0,cuda:1 or cpu (default: --device)")
    for name in SETTINGS[:2]:
        add_field(p, ServiceSettings, name)
    p.add_argument("--batching", default="auto", choices=["auto", "on", "off"], help="share model calls between "
                   "queued requests: auto (default) = on for GPUs, off on CPU, where it measured slower")
    p.add_argument("--no-batching", action="store_true", help="the same as --batching off")
    for name in SETTINGS[2:]:
        add_field(p, ServiceSettings, name)
    for flag, name in SECONDS:
        _seconds(p, flag, name)
    p.add_argument("--json-logs", action="store_true", help="log JSON lines (one per request, with timings)")
    model_args(p)
    p.set_defaults(func=serve)
