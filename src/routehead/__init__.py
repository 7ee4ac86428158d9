"""routehead: attention-based re-ranking with LLMs (ICR, static heads, per-query head routing)."""

from routehead.errors import RouteheadError

__version__ = "0.1.0"

__all__ = ["RouteheadError", "Reranker", "Ranking", "__version__"]


def __getattr__(name: str):
    # torch and transformers load only when the API is used, so `routehead --help` and the data tools stay quick
    if name in ("Reranker", "Ranking"):
        from routehead import api

        return getattr(api, name)
    raise AttributeError(name)
