"""routehead's production re-rank service (Cohere v1/v2, Jina, TEI shapes; batching; backpressure; metrics).

Modules: ``app`` (endpoints), ``shapes`` (request/response bodies), ``batching`` (queue and replica workers),
``tokens`` (token estimates), ``metrics`` (Prometheus), ``http`` (body/header timeouts), ``errors`` (the error
shape), ``config`` (limits and settings), ``docs`` (offline /docs), ``run`` (uvicorn, SIGTERM drain, logs).
"""

from routehead.service.app import create_app
from routehead.service.config import Limits, ServiceSettings
from routehead.service.run import serve

__all__ = ["Limits", "ServiceSettings", "create_app", "serve"]
