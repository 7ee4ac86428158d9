"""What an operator can tune: per-request limits and the batching/backpressure settings.

Two frozen dataclasses rather than one: ``Limits`` bound what a single request may ask for (checked before it
is queued, answered with a 4xx), ``ServiceSettings`` shape how the shared model is used under load.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields


def _check_positive(obj: object, allow_float: tuple[str, ...] = ()) -> None:
    for f in fields(obj):  # type: ignore[arg-type]
        value = getattr(obj, f.name)
        if value is None or isinstance(f.default, bool):
            continue
        ok_types = (int, float) if f.name in allow_float else (int,)
        if isinstance(value, bool) or not isinstance(value, ok_types) or value <= 0:
            kind = "a positive number" if f.name in allow_float else "a positive integer"
            raise ValueError(f"{type(obj).__name__}.{f.name} must be {kind}, got {value!r}")


@dataclass(frozen=True)
class Limits:
    """Per-request limits; they bound the memory and model time one request can ask for.

    ``max_request_bytes`` is enforced on raw bytes before parsing (413).  The others are enforced after
    parsing (422, type ``limit_exceeded``).  Characters are Unicode code points, cheap to check before the
    tokenizer runs; ``max_request_tokens`` then bounds compute: the estimated prompt tokens of the request
    (query plus every document after the engine's per-document truncation).
    """

    max_documents: int = 1000
    max_document_chars: int = 20000
    max_query_chars: int = 4000
    max_request_bytes: int = 5_000_000
    max_request_tokens: int = 65536

    def __post_init__(self) -> None:
        _check_positive(self)

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


@dataclass(frozen=True)
class ServiceSettings:
    """How queued requests share the model replicas.

    ``max_batch_tokens``/``max_batch_requests``: a worker takes queued requests into one ``rerank_many`` call
    while the batch's padded token cost (requests x longest prompt) stays under the budget; the first request
    is always taken, so a request over the budget runs alone rather than never.
    ``max_concurrent_requests``: admitted requests (queued + running); one more gets 429 with Retry-After.
    ``request_timeout_s``: a request not answered by then gets 504 and leaves the queue.
    ``body_timeout_s``/``header_timeout_s``: a client that sends its body or headers slower than this is cut off.
    ``graceful_shutdown_s``: on SIGTERM, in-flight requests get this long to finish before the process exits.
    ``batching=False`` runs one request per model call (the baseline the benchmark compares against).
    """

    max_batch_tokens: int = 16384
    max_batch_requests: int = 32
    max_concurrent_requests: int = 512
    request_timeout_s: float = 120.0
    body_timeout_s: float = 30.0
    header_timeout_s: float = 10.0
    graceful_shutdown_s: float = 30.0
    retry_after_s: int = 1
    max_connections: int | None = 1024
    batching: bool = True
    warmup: bool = True

    def __post_init__(self) -> None:
        _check_positive(self, allow_float=("request_timeout_s", "body_timeout_s", "header_timeout_s",
                                           "graceful_shutdown_s"))


def batching_for(mode: str, devices: list[str | None]) -> bool:
    """``auto``: batch on GPUs only. Measured on the CPU box (BENCHMARKS.md, "Service throughput"): a CPU pass
    over several prompts costs the sum of their passes plus padding (0.89x the requests/s of one at a time at
    16 clients), while on a GPU one pass's kernels carry many prompts for about the price of one."""
    if mode != "auto":
        return mode == "on"
    import torch

    return any((d or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda") for d in devices)
