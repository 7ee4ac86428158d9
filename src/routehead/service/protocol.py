"""What the service needs from a reranker: :class:`RerankerLike`, a ``typing.Protocol``.

:class:`routehead.Reranker` satisfies it, and so must anything else served (the tests' fakes do): the service
calls these methods and nothing else, and guesses nothing else about what a reranker can do; the one optional
keyword below is looked up by name, once per replica (:func:`takes_should_stop`).

- ``rerank(query, documents, first_stage_scores=None, routed_heads=False, evidence=0)``: one request.
- ``rerank_many(items, batch_size=8, evidence=0)``: several requests in one call (``items`` are
  ``(query, documents)`` or ``(query, documents, first_stage_scores)``), the rankings in input order; a
  reranker with no batched path may loop over ``rerank``.
- ``info()``: what is served (``model``, ``method``, ...): ``/health``, the response's ``model`` and the
  calibration lookup read it once, at start-up.
- ``prompt_tokens(query, documents)``: the prompt tokens ``rerank(query, documents)`` runs through the model,
  counted by the reranker itself (its tokenizer, prompt template and per-document cap): admission
  (``Limits.max_request_tokens``), the batch budget (``ServiceSettings.max_batch_tokens``) and the response's
  ``billed_units``/``usage`` are in these tokens.  It may raise :class:`routehead.errors.RouteheadError` for
  input the reranker would refuse (answered 422).

Optional: ``should_stop``, a keyword of both ``rerank`` and ``rerank_many``: a callable the reranker asks
between the steps of its work (:class:`routehead.Reranker`: before each decoder layer) and that, once True, makes
it raise :class:`routehead.errors.PassCancelled`.  The service passes it where both methods name it, so a model
call whose every request is abandoned (client gone, 504) frees the replica early; a reranker without it is served
as before, its calls running to the end.

Optional: ``max_chunks_per_doc``, a keyword of ``rerank``, ``rerank_many`` and ``prompt_tokens``: a request's
chunking of long documents (:class:`routehead.Reranker`: up to that many chunks of its per-document cap each, a
document scored by its best chunk; 1: truncation; not passed: the reranker's own setting).  The service passes it
where all three name it (:func:`takes_chunks`), both to count a request's tokens and to rank it; elsewhere a
request's ``max_chunks_per_doc`` is answered with a ``meta.warnings`` entry saying it was ignored.

A ranking (:class:`RankingLike`) has ``indices`` (best first) and ``scores``; ``heads``, ``weights`` and
``evidence`` may be None (a reranker that routes no heads or gives no evidence).
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from typing import Any, Protocol, runtime_checkable


class RankingLike(Protocol):
    """One query's ranking, as :class:`routehead.api.Ranking` (read-only here, so any sequence types fit)."""

    @property
    def indices(self) -> Sequence[int]: ...

    @property
    def scores(self) -> Sequence[float]: ...

    @property
    def heads(self) -> Sequence[tuple[int, int]] | None: ...

    @property
    def weights(self) -> Sequence[float] | None: ...

    @property
    def evidence(self) -> Sequence[Sequence[Mapping[str, Any]]] | None: ...


@runtime_checkable
class RerankerLike(Protocol):
    """What the service (and the adapters of :mod:`routehead.integrations`) call on a reranker."""

    def rerank(self, query: str, documents: Sequence[str], first_stage_scores: Sequence[float] | None = None,
               routed_heads: bool = False, evidence: int = 0) -> RankingLike: ...

    def rerank_many(self, items: Sequence[Any], batch_size: int = 8, evidence: int = 0
                    ) -> Sequence[RankingLike]: ...

    def info(self) -> Mapping[str, Any]: ...

    def prompt_tokens(self, query: str, documents: Sequence[str]) -> int: ...


def is_reranker(obj: object) -> bool:
    """Whether ``obj`` is a reranker instance (a class has the methods too, but unbound: it is a factory)."""
    return isinstance(obj, RerankerLike) and not isinstance(obj, type)


def _takes(reranker: object, keyword: str, methods: Sequence[str]) -> bool:
    """Whether each of ``reranker``'s ``methods`` names a ``keyword`` parameter; a ``**kwargs`` does not count, as
    nothing says it would be honoured."""
    for name in methods:
        try:
            params = inspect.signature(getattr(reranker, name)).parameters
        except (AttributeError, TypeError, ValueError):
            return False
        if keyword not in params or params[keyword].kind is inspect.Parameter.POSITIONAL_ONLY:
            return False
    return True


def takes_should_stop(reranker: object) -> bool:
    """Whether ``reranker``'s ``rerank`` and ``rerank_many`` both name a ``should_stop`` parameter (see above)."""
    return _takes(reranker, "should_stop", ("rerank", "rerank_many"))


def takes_chunks(reranker: object) -> bool:
    """Whether ``reranker``'s ``rerank``, ``rerank_many`` and ``prompt_tokens`` all name ``max_chunks_per_doc``
    (see above)."""
    return _takes(reranker, "max_chunks_per_doc", ("rerank", "rerank_many", "prompt_tokens"))


__all__ = ["RankingLike", "RerankerLike", "is_reranker", "takes_chunks", "takes_should_stop"]
