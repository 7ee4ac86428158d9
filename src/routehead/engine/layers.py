"""Which layers a pass runs: the decoder layers found by shape, an exit right after the deepest one needed, and a
stop at the next layer boundary once nobody waits for the pass (:func:`stop_when`)."""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator
from typing import Any

import torch

from routehead.errors import PassCancelled

_SHOULD_STOP: contextvars.ContextVar[Callable[[], bool] | None] = contextvars.ContextVar("routehead_should_stop",
                                                                                         default=None)


class StopForward(Exception):
    """Raised after the deepest needed layer: later layers do no work at all."""


def decoder_layers(model: Any) -> torch.nn.ModuleList:
    """The model's list of decoder layers, found by shape rather than by per-family attribute names."""
    from routehead.engine.model import text_config

    n = int(text_config(model.config).num_hidden_layers)
    base = model.get_decoder() if hasattr(model, "get_decoder") else model
    for mod in base.modules():
        if isinstance(mod, torch.nn.ModuleList) and len(mod) == n:
            return mod
    raise RuntimeError(f"could not find the {n} decoder layers of {type(model).__name__}")


@contextlib.contextmanager
def exit_after(layers: torch.nn.ModuleList, last: int, keep_output: bool = False) -> Iterator[dict]:
    """Stop the forward pass right after decoder layer ``last``; optionally keep that layer's output."""
    box: dict[str, torch.Tensor] = {}

    def hook(_module: Any, _args: Any, output: Any) -> None:
        if keep_output:
            box["hidden"] = output[0] if isinstance(output, tuple) else output
        raise StopForward

    handle = layers[last].register_forward_hook(hook)
    try:
        yield box
    except StopForward:
        pass
    finally:
        handle.remove()


def _check_stop(_module: Any, _args: Any) -> None:
    should_stop = _SHOULD_STOP.get()
    if should_stop is not None and should_stop():
        raise PassCancelled("the pass was stopped at a layer boundary: nobody waits for its result")


@contextlib.contextmanager
def stop_when(layers: torch.nn.ModuleList, should_stop: Callable[[], bool] | None) -> Iterator[None]:
    """Inside the block, every forward pass through ``layers`` asks ``should_stop()`` before each decoder layer
    and raises :class:`~routehead.errors.PassCancelled` there once it is true: a pass nobody waits for frees the
    model within one layer's time instead of running to the end.

    ``None`` does nothing (no hooks, the plain pass). The hooks live only for the block and read the callable
    from a context variable, so a pass run on the same model from another thread is never stopped by it.
    ``should_stop`` runs on the host once a layer: keep it a cheap flag read (no device sync).
    """
    if should_stop is None:
        yield
        return
    token = _SHOULD_STOP.set(should_stop)
    handles = [layer.register_forward_pre_hook(_check_stop) for layer in layers]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        _SHOULD_STOP.reset(token)
