"""Tiny random models of real architectures and a byte-level tokenizer: engine tests without downloads."""

from __future__ import annotations

import torch

from routehead.engine.model import LoadedModel, wrap_model
from routehead.testing import byte_tokenizer


def tiny_config(family: str):
    from transformers import Gemma3TextConfig, LlamaConfig, MistralConfig, Qwen2Config

    common = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_attention_heads=4,
                  max_position_embeddings=4096, bos_token_id=256, eos_token_id=257, pad_token_id=257)
    if family == "llama":
        return LlamaConfig(num_hidden_layers=4, num_key_value_heads=2, **common)
    if family == "qwen2":
        return Qwen2Config(num_hidden_layers=4, num_key_value_heads=1, **common)
    if family == "gemma3":
        # sliding_window=16: most layers see only the last 16 keys, so the model's own mask matters.
        return Gemma3TextConfig(num_hidden_layers=6, num_key_value_heads=2, head_dim=16, sliding_window=16,
                                **common)
    if family == "mistral":
        # one sliding window for every layer, passed to attention as a keyword (not a per-layer attribute)
        return MistralConfig(num_hidden_layers=3, num_key_value_heads=2, sliding_window=16, **common)
    raise ValueError(family)


def tiny_model(family: str, attn: str = "sdpa", seed: int = 0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = tiny_config(family)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation=attn, dtype=torch.float32)
    return model.eval()


def tiny_lm(family: str, chat: bool = True) -> LoadedModel:
    return wrap_model(tiny_model(family), byte_tokenizer(chat), name=f"tiny-{family}")


def eager_twin(lm: LoadedModel, family: str):
    """The same weights with eager attention, for output_attentions=True references."""
    ref = tiny_model(family, attn="eager")
    ref.load_state_dict(lm.model.state_dict())
    return ref.eval()
