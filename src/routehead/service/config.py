"""What an operator can tune: per-request limits and the batching/backpressure settings.

Two frozen dataclasses rather than one: ``Limits`` bound what a single request may ask for (checked before it
is queued, answered with a 4xx), ``ServiceSettings`` shape how the shared model is used under load.  They are
the one home of every service default: ``routehead serve`` builds its options from these fields (their
``metadata["help"]``) and :class:`~routehead.service.batching.Batcher` takes a ``ServiceSettings``.  Torch-free:
which devices batch (:func:`batching_for`) is decided from device names resolved by the caller.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields

DEFAULT_HOST = "127.0.0.1"  # loopback: the service has no authentication
DEFAULT_PORT = 8000


def _help(text: str) -> dict[str, str]:
    return {"help": text}


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
    tokenizer runs; ``max_request_tokens`` then bounds compute: the prompt tokens the reranker says the request
    costs (``RerankerLike.prompt_tokens``: instruction, query and every document after its per-document cap).
    """

    max_documents: int = field(default=1000, metadata=_help("documents a request may carry (422 past it)"))
    max_document_chars: int = field(default=20000, metadata=_help("characters a document may have (422 past it)"))
    max_query_chars: int = field(default=4000, metadata=_help("characters the query may have (422 past it)"))
    max_request_bytes: int = field(default=5_000_000, metadata=_help("bytes a request body may have (413 past it)"))
    max_request_tokens: int = field(default=65536, metadata=_help("prompt tokens a request may cost, counted by "
                                                                   "the reranker (422 past it)"))

    def __post_init__(self) -> None:
        _check_positive(self)

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


@dataclass(frozen=True)
class ServiceSettings:
    """How queued requests share the model replicas.

    ``max_batch_tokens``/``max_batch_requests``: a worker takes queued requests into one ``rerank_many`` call
    while the batch's padded token cost (requests x longest prompt, in the reranker's own token count) stays
    under the budget; the first request
    is always taken, so a request over the budget runs alone rather than never.
    ``max_concurrent_requests``: admitted requests (queued + running); one more gets 429 with Retry-After.
    ``request_timeout_s``: a request not answered by then gets 504 and leaves the queue; and one that the work
    queued ahead of it would keep past it (the queued prompt tokens at the measured tokens/s:
    :mod:`~routehead.service.load`) gets 429 at once, its Retry-After from that estimate.
    ``body_timeout_s``/``header_timeout_s``: a client that sends its body or headers slower than this is cut off.
    ``graceful_shutdown_s``: on SIGTERM, new requests get 503 and every admitted one is answered within this
    long (its ranking, or 503 with Retry-After where the queue cannot reach it in time); the process exits
    within it.
    ``batching=False`` runs one request per model call (the baseline the benchmark compares against).
    """

    max_batch_tokens: int = field(default=16384, metadata=_help("padded prompt tokens per model call"))
    max_batch_requests: int = field(default=32, metadata=_help("requests per model call"))
    max_concurrent_requests: int = field(default=512, metadata=_help("queued + running; 429 past it"))
    request_timeout_s: float = field(default=120.0, metadata=_help("seconds before a request gets 504 (429 at "
                                                                   "once when the queue ahead would take longer)"))
    body_timeout_s: float = field(default=30.0, metadata=_help("seconds a client may take to send its body"))
    header_timeout_s: float = field(default=10.0, metadata=_help("seconds a client may take to send its headers"))
    graceful_shutdown_s: float = field(default=30.0, metadata=_help("seconds SIGTERM gives in-flight work (then "
                                                                    "503); the process exits within it"))
    retry_after_s: int = field(default=1, metadata=_help("Retry-After of a 429 or 503, in seconds"))
    max_connections: int | None = field(default=1024, metadata=_help("open connections; 503 past it"))
    batching: bool = field(default=True, metadata=_help("share model calls between queued requests"))
    warmup: bool = field(default=True, metadata=_help("run a tiny request on each replica before /ready"))

    def __post_init__(self) -> None:
        _check_positive(self, allow_float=("request_timeout_s", "body_timeout_s", "header_timeout_s",
                                           "graceful_shutdown_s"))


def batching_for(mode: str, devices: Sequence[str]) -> bool:
    """Whether to batch for ``mode`` (``auto``, ``on``, ``off``) on ``devices``, resolved device names
    (``cuda:0``, ``cpu``; the caller resolves "the default device", :mod:`routehead.cli.serve` with torch).

    ``auto``: batch on GPUs only. Measured on the CPU box (BENCHMARKS.md, "Service throughput"): a CPU pass
    over several prompts costs the sum of their passes plus padding (0.89x the requests/s of one at a time at
    16 clients), while on a GPU one pass's kernels carry many prompts for about the price of one."""
    if mode != "auto":
        return mode == "on"
    return any(d.startswith("cuda") for d in devices)
