"""Random-weight models of real shapes, built directly on a device: speed and kernel checks without downloads.

``random:<shape>`` (``llama-3.1-8b``, ``smollm2-135m``, ``tiny``) is a Llama with that shape's cost-fixing
fields and random weights, with the byte-level tokenizer of :mod:`routehead.testing` (one token per byte); bf16 on
CUDA, fp32 on CPU. Anything else is a model spec for :func:`routehead.engine.model.load_model`.
"""

from __future__ import annotations

from typing import Any

import torch

from routehead.engine.model import LoadedModel, load_model, wrap_model
from routehead.errors import RouteheadError
from routehead.testing import byte_tokenizer

# Llama-3.1-8B: its config.json (hidden 4096, 32 layers, 32 heads, 8 kv heads, MLP 14336, vocab 128256,
# rope_theta 500000 with llama3 rope scaling, 131072 positions, untied embeddings).
RANDOM_SHAPES: dict[str, dict[str, Any]] = {
    "llama-3.1-8b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                         intermediate_size=14336, vocab_size=128256, max_position_embeddings=131072,
                         rope_theta=500000.0, tie_word_embeddings=False,
                         rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
    # SmolLM2-135M (the default model's shape; its config.json): hidden 576, 30 layers, 9 heads, 3 kv heads.
    "smollm2-135m": dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                         intermediate_size=1536, vocab_size=49152, max_position_embeddings=8192,
                         rope_theta=100000.0, tie_word_embeddings=True),
    "tiny": dict(hidden_size=64, num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=96, vocab_size=300, max_position_embeddings=32768, rope_theta=10000.0),
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def random_lm(shape: str, device: str, dtype: str | None = None) -> LoadedModel:
    """A random-weight Llama of a named shape, built directly on ``device`` (no host copy of the weights)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    if shape not in RANDOM_SHAPES:
        raise RouteheadError(f"unknown random shape {shape!r}; known: {sorted(RANDOM_SHAPES)}")
    dev = torch.device(device)
    dt = DTYPES[dtype or ("bfloat16" if dev.type == "cuda" else "float32")]
    kw = dict(RANDOM_SHAPES[shape])
    ids = dict(bos_token_id=256, eos_token_id=257, pad_token_id=257)
    try:
        cfg = LlamaConfig(**ids, **kw)
    except (TypeError, ValueError):  # a transformers that only takes rope_parameters
        theta, scaling = kw.pop("rope_theta"), kw.pop("rope_scaling", None) or {"rope_type": "default"}
        cfg = LlamaConfig(**ids, rope_parameters={**scaling, "rope_theta": theta}, **kw)
    rp = getattr(cfg, "rope_parameters", None)
    if isinstance(rp, dict) and rp.get("rope_theta") != RANDOM_SHAPES[shape]["rope_theta"]:  # API drift guard
        rp["rope_theta"] = RANDOM_SHAPES[shape]["rope_theta"]
    torch.manual_seed(0)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dt)
    try:
        with torch.device(dev):
            model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa", dtype=dt)
    finally:
        torch.set_default_dtype(prev)
    if next(model.parameters()).device.type != dev.type:  # a transformers that ignored the device context
        model = model.to(dev)
    return wrap_model(model, byte_tokenizer(), name=f"random:{shape}")


def build_lm(spec: str | None, device: str, dtype: str | None = None) -> LoadedModel:
    """``random:<shape>`` (:func:`random_lm`) or a model spec for :func:`load_model` (None: the default model)."""
    if spec and spec.startswith("random:"):
        return random_lm(spec.split(":", 1)[1], device, dtype)
    return load_model(spec, device=device, dtype=dtype)


def model_shape(lm: LoadedModel) -> dict[str, Any]:
    """The fields that fix a model's cost, as the built config holds them (proof of the shape that ran)."""
    c = lm.config
    keys = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "intermediate_size",
            "vocab_size", "max_position_embeddings", "rope_theta", "rope_parameters", "rope_scaling",
            "tie_word_embeddings", "_attn_implementation")
    return {k: getattr(c, k) for k in keys if getattr(c, k, None) is not None}
