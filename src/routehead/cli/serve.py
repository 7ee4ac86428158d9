"""``routehead serve``: the HTTP service (:mod:`routehead.service`)."""

from __future__ import annotations

import argparse
from typing import Any

from routehead.cli.options import model_args
from routehead.cli.rerank import method_args


def serve(args: argparse.Namespace) -> None:
    from routehead.api import Reranker
    from routehead.service import Limits, ServiceSettings, serve
    from routehead.service.config import batching_for

    devices = [d.strip() for d in args.devices.split(",") if d.strip()] if args.devices else [args.device]

    def factory() -> list[Reranker]:
        """One replica per device, all behind the same queue (loaded after the socket opens: /ready is 503)."""
        return [Reranker(model=args.model, method=args.method, router=args.router, heads=args.heads,
                         device=device, dtype=args.dtype, trust_remote_code=args.trust_remote_code,
                         doc_order=args.doc_order, layout=args.layout)
                for device in devices]

    settings = ServiceSettings(max_batch_tokens=args.max_batch_tokens, max_batch_requests=args.max_batch_requests,
                               max_concurrent_requests=args.max_concurrent_requests,
                               request_timeout_s=args.request_timeout, graceful_shutdown_s=args.graceful_shutdown,
                               max_connections=args.max_connections,
                               batching=batching_for(args.batching if not args.no_batching else "off", devices))
    serve(factory, host=args.host, port=args.port, settings=settings, json_logs=args.json_logs,
          replica_names=[d or "default" for d in devices],
          limits=Limits(max_documents=args.max_documents, max_document_chars=args.max_document_chars,
                        max_request_tokens=args.max_request_tokens))


def register(sub: Any) -> None:
    p = sub.add_parser("serve", help="HTTP re-rank service (Cohere /v1|v2/rerank, TEI /rerank, /health, /ready, "
                       "/metrics)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    method_args(p)
    p.add_argument("--max-documents", type=int, default=1000)
    p.add_argument("--max-document-chars", type=int, default=20000)
    p.add_argument("--max-request-tokens", type=int, default=65536, help="estimated prompt tokens a request may "
                   "cost (422 past it)")
    p.add_argument("--devices", default=None, help="comma-separated devices, one model replica each behind one "
                   "queue: cuda:0,cuda:1 or cpu (default: --device)")
    p.add_argument("--max-batch-tokens", type=int, default=16384, help="padded prompt tokens per model call")
    p.add_argument("--max-batch-requests", type=int, default=32, help="requests per model call")
    p.add_argument("--batching", default="auto", choices=["auto", "on", "off"], help="share model calls between "
                   "queued requests: auto (default) = on for GPUs, off on CPU, where it measured slower")
    p.add_argument("--no-batching", action="store_true", help="the same as --batching off")
    p.add_argument("--max-concurrent-requests", type=int, default=512, help="queued + running; 429 past it")
    p.add_argument("--max-connections", type=int, default=1024, help="open connections; 503 past it")
    p.add_argument("--request-timeout", type=float, default=120.0, help="seconds before a request gets 504")
    p.add_argument("--graceful-shutdown", type=float, default=30.0, help="seconds SIGTERM waits for in-flight work")
    p.add_argument("--json-logs", action="store_true", help="log JSON lines (one per request, with timings)")
    model_args(p)
    p.set_defaults(func=serve)
