"""Errors that are the user's to fix (bad input, missing model, wrong file) carry a clear message."""


class RouteheadError(ValueError):
    """A clear, user-facing error: what went wrong and what to do about it."""
