"""Which layers a pass runs: the decoder layers found by shape, and an exit right after the deepest one needed."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch


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
