"""Head selections: every method is a choice of heads over the same forward pass. The registry
(:mod:`.registry`) is torch-free; a method's class (:mod:`.base`, one file each) loads with it."""

from routehead.selection.registry import DEFAULT_METHOD, METHODS, MethodSpec, load_method, method_spec, resolve_method

__all__ = ["DEFAULT_METHOD", "METHODS", "MethodSpec", "load_method", "method_spec", "resolve_method"]
