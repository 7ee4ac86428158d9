"""Errors that are the user's to fix (bad input, missing model, wrong file) carry a clear message."""


class RouteheadError(ValueError):
    """A clear, user-facing error: what went wrong and what to do about it."""


class PassCancelled(Exception):
    """A forward pass stopped at a decoder layer boundary because its caller's ``should_stop()`` said nobody
    waits for the result any more (a client gone, a deadline passed): not an error of the input, so it is no
    :class:`RouteheadError`, and the caller that asked for the stop expects it."""
