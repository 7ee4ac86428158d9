"""Adapters that put routehead where users already re-rank: LangChain, LlamaIndex, Haystack and rerankers.

Each adapter is one small module importing its framework only when used, so ``import routehead`` never needs
them; a missing framework raises an ImportError that names the extra to install
(``pip install 'routehead[langchain]'``, ``[llamaindex]``, ``[haystack]``, ``[rerankers]``, or all of them with
``[integrations]``).

What all adapters share lives here: how a re-ranker is built from adapter settings (:func:`load_reranker`), how
the retriever's scores become ``first_stage_scores`` (:func:`first_stage_scores`), and how a ranking is
described in a document's metadata (:func:`ranking_metadata`).

What an adapter calls on the re-ranker is a subset of :class:`routehead.service.protocol.RerankerLike` (the
contract the HTTP service states): ``rerank(query, documents, first_stage_scores=...)``, whose ranking has
``indices``, ``scores``, ``heads``, ``weights`` and ``first_stage``.  Nothing is probed: a built re-ranker is
a :class:`routehead.Reranker`, which takes every setting an adapter passes.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, Union

from routehead.errors import RouteheadError

if TYPE_CHECKING:
    from routehead.api import Ranking, Reranker
    from routehead.engine.model import LoadedModel

__all__ = ["ModelSpec", "first_stage_scores", "load_reranker", "ranking_metadata", "require", "reranker_for",
           "supports_instruction"]

# What an adapter accepts as ``model``: a name/path/hub id (None: the embedded default), an already loaded model,
# a ready Reranker to share between adapters, or a zero-argument factory returning a LoadedModel or a Reranker
# (a factory lets Ray actors and tests build a model where it runs instead of pickling one).
ModelSpec = Union[str, Path, "LoadedModel", "Reranker", Callable[[], Any], None]

# metadata keys every adapter writes (one vocabulary across frameworks)
SCORE_KEY = "relevance_score"
HEADS_KEY = "routed_heads"
WEIGHTS_KEY = "head_weights"
FIRST_STAGE_KEY = "first_stage_used"


def require(module: str, extra: str) -> ModuleType:
    """Import an optional framework, or raise an ImportError that says which routehead extra installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(f"this routehead adapter needs {module.split('.')[0]!r}: "
                          f"pip install 'routehead[{extra}]'") from exc


def supports_instruction() -> bool:
    """Whether :class:`routehead.Reranker` takes ``instruction=`` (the prompt's task instruction): always, since
    the instruction became a Reranker setting; kept for callers that checked."""
    return True


def load_reranker(model: ModelSpec = None, method: str | None = None, router: str | Path | None = None,
                  heads: Any = None, max_doc_tokens: int | None = None, instruction: str | None = None,
                  device: str | None = None, dtype: str | None = None, layout: str | None = None,
                  max_chunks_per_doc: int | None = None, **kwargs: Any) -> Reranker:
    """Build the :class:`routehead.Reranker` an adapter scores with, from the adapter's settings.

    ``model`` may already be a Reranker (used as is, so several adapters can share one model in memory) or a
    zero-argument factory. ``layout`` names the prompt layout (None: the one the heads or router were chosen
    under, else the reference). ``instruction`` and ``max_chunks_per_doc`` (long documents: up to that many chunks
    each, scored by the best; None: the Reranker's default, truncation) are passed on only when given.
    """
    from routehead.api import Reranker

    if callable(model) and not isinstance(model, (str, Path)):
        model = model()
    if _is_reranker(model):
        for name, value in (("instruction", instruction), ("layout", layout),
                            ("max_chunks_per_doc", max_chunks_per_doc)):
            if value is not None:
                raise RouteheadError(f"{name}= cannot be applied to an already built Reranker; "
                                     f"pass it to Reranker(..., {name}=...) instead")
        return model  # type: ignore[return-value]
    if instruction is not None:
        kwargs["instruction"] = instruction
    if max_chunks_per_doc is not None:
        kwargs["max_chunks_per_doc"] = max_chunks_per_doc
    return Reranker(model=model, method=method, router=router, heads=heads, max_doc_tokens=max_doc_tokens,
                    device=device, dtype=dtype, layout=layout, **kwargs)


# the Reranker settings every adapter exposes under the same names (besides ``model``)
SETTINGS = ("method", "router", "heads", "max_doc_tokens", "instruction", "device", "dtype", "layout",
            "max_chunks_per_doc")


def reranker_for(adapter: Any) -> Reranker:
    """:func:`load_reranker` from an adapter's ``model`` and :data:`SETTINGS` attributes."""
    return load_reranker(adapter.model, **{k: getattr(adapter, k) for k in SETTINGS})


def _is_reranker(obj: Any) -> bool:
    from routehead.api import Reranker

    return isinstance(obj, Reranker)


def first_stage_scores(scores: Sequence[Any]) -> list[float] | None:
    """The retriever's scores as ``first_stage_scores``, or None unless every document has a finite one.

    A partial list cannot be standardised against the others, so it is dropped whole rather than guessed.
    """
    out: list[float] = []
    for s in scores:
        if s is None or isinstance(s, (bool, str)):
            return None
        try:
            f = float(s)
        except (TypeError, ValueError):
            return None
        if not math.isfinite(f):
            return None
        out.append(f)
    return out if out else None


def ranking_metadata(ranking: Ranking, rank: int) -> dict[str, Any]:
    """What one re-ranked document carries in its metadata: its score and this query's routed heads."""
    meta: dict[str, Any] = {SCORE_KEY: ranking.scores[rank]}
    if ranking.heads is not None:
        meta[HEADS_KEY] = [[int(a), int(b)] for a, b in ranking.heads]
    if ranking.weights is not None:
        meta[WEIGHTS_KEY] = [float(w) for w in ranking.weights]
        meta[FIRST_STAGE_KEY] = bool(ranking.first_stage)
    return meta
