"""routehead: attention-based re-ranking with LLMs (ICR, static heads, per-query head routing)."""

from routehead.errors import RouteheadError

__version__ = "0.1.0"

__all__ = ["RouteheadError", "__version__"]
