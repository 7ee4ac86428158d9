"""Small, download-free stand-ins for tests and benchmarks: a byte-level tokenizer with a chat template.

Every byte is a token, so any text round-trips exactly; with random-weight models built from a config this
exercises the whole engine without weights from a hub.
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|user|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


def byte_tokenizer(chat: bool = True) -> PreTrainedTokenizerFast:
    """Every byte is a token, so any text round-trips exactly; four special tokens on top."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(alphabet)}
    specials = ["<s>", "</s>", "<|user|>", "<|end|>", "<|assistant|>"]
    for s in specials:
        vocab[s] = len(vocab)
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tk.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>",
                                   additional_special_tokens=specials[2:])
    if chat:
        fast.chat_template = CHAT_TEMPLATE
    return fast
