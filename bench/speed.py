"""Speed and peak memory of head scoring against a plain forward pass and against the naive eager way.

    python bench/speed.py --quick --json                     # CPU smoke run, default model (SmolLM2-135M)
    python bench/speed.py                                    # 20 SciFact docs, 5 repeats, isolated, table
    python bench/speed.py --model random:llama-3.1-8b --device cuda --tokens 2048 8192 16384 32768
    python bench/speed.py --model random:llama-3.1-8b --device cuda --throughput --no-methods --batch-sizes 1 4
    python bench/speed.py --model random:tiny --tokens 256 --no-isolate    # seconds, for tests

Methods, each timed per query (tokenization included) on the same prompt:

- ``bare``: :meth:`HeadScorer.bare_forward`, one plain SDPA pass over prefix + query, all layers: the floor.
- ``full``: ICR as ``Reranker(method="icr")`` runs it (:func:`rerank_pass`: all heads, one pass over prefix +
  query + "N/A", the heads' token scores summed, masked, summed; no per-head scores).
- ``full_per_head``: the same pass that also gives every head's own masked score (``HeadScorer.score``: what
  head detection and the score store run). Until 2026-12-04 this was the pass timed as ``full``.
- ``full_torch``: ``full`` with the span rows computed by torch ops (``capture.kernel("torch")``) instead of
  the fused Triton kernels that ``full`` uses on a GPU; on CPU both are the torch path.
- ``static16``: :func:`rerank_pass` with a fixed set of 16 heads in the first half of the model. Rule: the pool is
  ``[(l, h) for l in range(L // 2) for h in range(H)]`` (layers ``0 .. L/2 - 1``) and the 16 heads are
  ``pool[round(i * (len(pool) - 1) / 15)]`` for ``i = 0..15`` (evenly spread, first and last included; the
  whole pool if it has fewer than 16). Exit after layer ``L/2 - 1``.
- ``routed``: for a model with a shipped router (SmolLM2, Gemma-3-270M), RouteHead's real path: the
  query-embedding pass, routing, then :func:`rerank_pass` with the routed heads only (exit after the deepest); the
  heads it routed are in ``heads.routed``. For other models a routed-style set of 4 heads whose deepest
  layer sits at 2/3 of the depth. Rule: ``d = round(2 L / 3)``; layers ``round(j * (d - 1) / 3)`` and heads
  ``(j * H) // 4`` for ``j = 0..3`` (so the deepest head is in layer ``d - 1`` and ``d`` of ``L`` layers run).
  SmolLM2 (30 x 9): ``(0,0) (6,2) (13,4) (19,6)``; Llama-3.1-8B (32 x 32): ``(0,0) (7,8) (13,16) (20,24)``.
- ``eager``: the naive way: the same weights switched to ``attn_implementation="eager"``, the whole prompt
  (prefix + query) in one pass with ``output_attentions=True``, then the query rows of every head and the same
  per-document masking and sum. One pass only (ICR's calibration pass with "N/A" would double it), so
  ``eager_over_bare`` is a lower bound on the naive cost. A CUDA OOM is recorded as ``"OOM"``; on CPU, where
  the kernel's OOM killer would end the process (and may pick a neighbour), the pass is not started when the
  attentions it must return (``(L + 3) * H * T^2`` elements, see :func:`eager_bytes`) exceed ``--eager-max-gb``
  (default: 80 % of MemAvailable) and is recorded as ``"OOM"`` with ``eager_note`` saying it was predicted.

``--quick`` (a smoke run that fits ~3 minutes on a busy 2-core CPU, where one 20-document pass takes 10 s or
more): 6 documents (~1.1k tokens) instead of 20, 2 repeats, and memory measured in-process (no child
processes, whose import + model load would cost ~15 s each). Use the default run for numbers to quote.

Threads (``--threads auto``, the default): torch's default, lowered on CPU to the cores the 1-minute load
average leaves free (at least 1); the count and the reason are in ``config``. See :func:`auto_threads`.

Times: median over ``--repeats`` after ``--warmup`` untimed calls (CUDA synchronised). Ratios:
``full_over_bare``, ``full_per_head_over_bare``, ``full_torch_over_bare``, ``routed_over_full``,
``routed_over_bare``, ``static16_over_bare``, ``eager_over_bare``.

Peak memory (``peak_mem_mb``: the peak during the timed repeats *above* what was held after the warm-up,
i.e. above the weights and any one-time allocations; ``peak_mem_over_bare`` is ``full``'s over ``bare``'s,
every method's is in ``peak_mem_over_bare_by_method``):

- CUDA: ``torch.cuda.max_memory_allocated()`` minus ``memory_allocated()`` before, stats reset per method.
- CPU: times come from a first phase under glibc's defaults (what users run); peak memory from a second phase
  (one warm-up, one call per method) with glibc's mmap threshold fixed at 64 KiB (:func:`fix_malloc_thresholds`,
  ``config.malloc``), so that RSS follows live tensors rather than heap fragments; the first phase's peaks stay
  in ``peak_mem_mb_default_malloc``. ``--default-malloc`` skips the second phase.
- CPU (default ``--isolate``): every method runs in its own fresh child process (multiprocessing ``spawn``)
  that loads the model and builds the prompt, then resets the kernel's peak-RSS mark (``echo 5 >
  /proc/self/clear_refs``) and reads ``VmHWM - VmRSS`` (before the method) from ``/proc/self/status`` after
  warm-up and repeats. A fresh process means no allocator cache carried over from another method. Where
  ``clear_refs`` cannot be written the child's ``ru_maxrss`` is used instead (which includes the load peak:
  an upper bound, said in ``memory_method``). ``--no-isolate`` measures in-process with the same ``VmHWM``
  reset, after glibc ``malloc_trim(0)`` hands freed heap back (memory an allocator still keeps is reused
  without raising RSS: an underestimate).

Documents: ``--docs`` (20) SciFact documents from ``<data-root>/scifact/corpus.jsonl`` (``title. text``, cut to
``--doc-words`` (120) words): the judged documents of the first test query, then corpus documents in file order;
the query is that test query. Without the data, or with ``--tokens``, or for a ``random:`` model, documents
are deterministic synthetic text sized in the model's tokens (``--doc-tokens``, 170 ~ 120 SciFact words in
SmolLM2's tokenizer). ``--tokens T ...`` builds prompts of about ``T`` tokens: ``--docs`` documents if given,
else ``round(T / (doc_tokens + 6))``, each sized so prefix + query reaches ``T`` (no per-document truncation).

``--throughput``: queries per second at ``--candidates`` (20 100) documents for ``--queries`` queries, for
``--throughput-methods`` (full routed) and each of ``--batch-sizes`` (1: one query at a time; b: b prompts per
forward pass, :meth:`HeadScorer.score_many`; keys ``full@b``); each query has its own candidate list (SciFact:
its judged documents then corpus documents from a query-dependent offset). Windows are used when a list does
not fit the model's context (SmolLM2: 8192 tokens). On CUDA, ``gpu_busy`` is the share of the time per query
the GPU spends in kernels (:func:`gpu_busy`).

``random:<shape>`` builds a random-weight model of that shape (``llama-3.1-8b``, ``smollm2-135m``, ``tiny``) with
a byte-level tokenizer (one token per byte), directly on the device (bf16 on CUDA, fp32 on CPU).

Output: one JSON object (``--json``) or a table, and the JSON written to ``results/speed/<name>.json``
(``--out``). With one prompt size the run's fields are also at the top level; ``runs`` always has them all.
The file is rewritten after every size, so a run cut short keeps what it finished.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import math
import os
import platform
import random
import re
import resource
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from routehead import capture  # noqa: E402
from routehead.api import router_path  # noqa: E402
from routehead.model import LoadedModel, load_model, wrap_model  # noqa: E402
from routehead.router import Router, load_router  # noqa: E402
from routehead.scorer import HeadScorer, HeadSet, mask_outliers_and_sum  # noqa: E402
from routehead.testing import byte_tokenizer  # noqa: E402

METHODS = ("bare", "full", "full_per_head", "full_torch", "static16", "routed", "eager")
ROOT = Path(__file__).resolve().parents[1]
SYNTH_QUERY = "Which paragraph describes how the protein complex regulates cell growth?"

# Shapes of random-weight models. Llama-3.1-8B: its config.json (hidden 4096, 32 layers, 32 heads, 8 kv heads,
# MLP 14336, vocab 128256, rope_theta 500000 with llama3 rope scaling, 131072 positions, untied embeddings).
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


# -- head rules -----------------------------------------------------------------------------------------------
def static16_heads(num_layers: int, num_heads: int, k: int = 16) -> list[tuple[int, int]]:
    """16 heads spread evenly over layers ``0 .. L/2 - 1`` (see the module docstring)."""
    pool = [(lay, h) for lay in range(max(1, num_layers // 2)) for h in range(num_heads)]
    if len(pool) <= k:
        return pool
    return [pool[round(i * (len(pool) - 1) / (k - 1))] for i in range(k)]


def routed_heads(num_layers: int, num_heads: int, k: int = 4) -> list[tuple[int, int]]:
    """4 heads, the deepest in layer ``round(2 L / 3) - 1`` (see the module docstring)."""
    deepest = max(1, round(2 * num_layers / 3)) - 1
    picks = {(round(j * deepest / (k - 1)), (j * num_heads) // k) for j in range(k)}
    return sorted(picks)


ROUTER_PATH: dict[str, str | None] = {"path": None}  # --router, set by setup() in the parent and every child


def shipped_router(lm: LoadedModel) -> Router | None:
    """``--router`` if given, else the router shipped for this model (SmolLM2, Gemma-3-270M), or None."""
    path, _ = router_path(lm.name, ROUTER_PATH["path"])  # a path or a shipped variant (bce, fs, fast)
    return load_router(path, lm.identity()) if path.is_file() else None


def routed_source(scorer: HeadScorer, router: Router | None, query: str) -> dict[str, Any]:
    if router is None:
        return {"source": "synthetic", "heads": routed_heads(scorer.lm.num_layers, scorer.lm.num_heads)}
    heads = router.route(scorer.query_embedding(query, router.config.embed_layer, router.config.pooling)).heads
    return {"source": ROUTER_PATH["path"] or "shipped router", "embed_layer": router.config.embed_layer,
            "heads": [list(h) for h in heads]}


def eager_bytes(num_layers: int, num_heads: int, tokens: int, elem: int) -> int:
    """Memory the eager pass needs beyond SDPA: the L returned ``[H, T, T]`` attentions plus ~3 in flight."""
    return (num_layers + 3) * num_heads * tokens * tokens * elem


# -- models ---------------------------------------------------------------------------------------------------
def random_lm(shape: str, device: str, dtype: str | None) -> LoadedModel:
    """A random-weight Llama of a named shape, built directly on ``device`` (no host copy of the weights)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    if shape not in RANDOM_SHAPES:
        raise SystemExit(f"unknown random shape {shape!r}; known: {sorted(RANDOM_SHAPES)}")
    dev = torch.device(device)
    dt = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[
        dtype or ("bfloat16" if dev.type == "cuda" else "float32")]
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


def model_shape(lm: LoadedModel) -> dict[str, Any]:
    """The fields that fix a model's cost, as the built config holds them (proof of the shape that ran)."""
    c = lm.config
    keys = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "intermediate_size",
            "vocab_size", "max_position_embeddings", "rope_theta", "rope_parameters", "rope_scaling",
            "tie_word_embeddings", "_attn_implementation")
    return {k: getattr(c, k) for k in keys if getattr(c, k, None) is not None}


def build_lm(spec: str | None, device: str, dtype: str | None) -> LoadedModel:
    if spec and spec.startswith("random:"):
        return random_lm(spec.split(":", 1)[1], device, dtype)
    return load_model(spec, device=device, dtype=dtype)


# -- documents ------------------------------------------------------------------------------------------------
_SYLLABLES = ["pro", "te", "in", "cel", "lu", "lar", "gen", "ex", "pres", "sion", "ma", "cro", "pha", "ge", "ki",
              "nase", "re", "cep", "tor", "sig", "nal", "ing", "mi", "to", "chon", "dri", "al", "the", "of", "and"]


def synthetic_text(n_words: int, seed: int) -> str:
    rng = random.Random(seed)
    words = ["".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(1, 3))) for _ in range(n_words)]
    sentences, i = [], 0
    while i < len(words):
        k = rng.randint(8, 16)
        chunk = words[i:i + k]
        sentences.append(chunk[0].capitalize() + " " + " ".join(chunk[1:]) if len(chunk) > 1 else chunk[0])
        i += k
    return ". ".join(sentences) + "."


def _cut_words(text: str, n: int) -> str:
    words = text.split()
    return " ".join(words[:n])


def _doc_text(d: dict) -> str:
    title, text = (d.get("title") or "").strip(), (d.get("text") or "").strip()
    if title and text:
        return f"{title}{' ' if title[-1] in '.!?:;' else '. '}{text}"
    return title or text


class SciFact:
    """The SciFact corpus (file order), test queries (qrels order) and their judged documents."""

    def __init__(self, root: Path) -> None:
        d = root / "scifact"
        self.docs: list[tuple[str, str]] = []
        with open(d / "corpus.jsonl", encoding="utf-8") as f:
            for line in f:
                row = json.loads(line)
                self.docs.append((str(row["_id"]), _doc_text(row)))
        self.index = {did: i for i, (did, _) in enumerate(self.docs)}
        queries = {}
        with open(d / "queries.jsonl", encoding="utf-8") as f:
            for line in f:
                row = json.loads(line)
                queries[str(row["_id"])] = row["text"]
        self.qrels: dict[str, list[str]] = {}
        with open(d / "qrels" / "test.tsv", encoding="utf-8") as f:
            for line in f:
                parts = line.rstrip("\n").split("\t")
                if len(parts) < 3 or parts[0] == "query-id" or float(parts[2]) <= 0:
                    continue
                self.qrels.setdefault(parts[0], []).append(parts[1])
        self.queries = [(qid, queries[qid]) for qid in self.qrels if qid in queries]

    def case(self, i: int, n_docs: int, words: int) -> tuple[str, list[str]]:
        """Query ``i``: its judged documents first, then corpus documents from offset ``i * 997``."""
        _, query = self.queries[i % len(self.queries)]
        picked = [self.index[d] for d in self.qrels[self.queries[i % len(self.queries)][0]] if d in self.index]
        picked = picked[:n_docs]
        j = (i * 997) % len(self.docs)
        while len(picked) < n_docs:
            if j not in picked:
                picked.append(j)
            j = (j + 1) % len(self.docs)
        return query, [_cut_words(self.docs[k][1], words) for k in picked]


def sized_docs(scorer: HeadScorer, n_docs: int, doc_tokens: float, seed: int) -> list[str]:
    """``n_docs`` synthetic documents of about ``doc_tokens`` tokens each in the scorer's tokenizer."""
    sample = synthetic_text(400, seed=10**6 + seed)
    per_word = len(scorer.builder._encode(" " + sample, special=False)) / 400
    words = max(1, round(doc_tokens / per_word))
    docs = [synthetic_text(words, seed * 100_003 + k) for k in range(n_docs)]
    got = sum(scorer.builder.prepare_documents(docs)[1]) / n_docs
    if got > 0 and abs(got - doc_tokens) > 2:  # one correction step for the tokenizer's actual rate
        words = max(1, round(words * doc_tokens / got))
        docs = [synthetic_text(words, seed * 100_003 + k) for k in range(n_docs)]
    return docs


def docs_for_tokens(scorer: HeadScorer, tokens: int, n_docs: int | None, doc_tokens: int, seed: int = 0
                    ) -> tuple[str, list[str]]:
    """A synthetic query and documents whose prompt (prefix + query) is about ``tokens`` tokens."""
    b = scorer.builder
    per_doc_fixed = b.fixed_tokens(1, SYNTH_QUERY) - b.fixed_tokens(0, SYNTH_QUERY)
    n = n_docs or max(1, round((tokens - b.fixed_tokens(0, SYNTH_QUERY)) / (doc_tokens + per_doc_fixed)))
    room = tokens - b.fixed_tokens(n, SYNTH_QUERY)
    if room < n:
        raise SystemExit(f"--tokens {tokens} is too small for {n} documents")
    return SYNTH_QUERY, sized_docs(scorer, n, room / n, seed)


# -- one prompt size, one method ------------------------------------------------------------------------------
def auto_threads(device: str) -> tuple[int, str]:
    """torch's default thread count, lowered to the cores other processes leave free (CPU runs only).

    On a shared CPU, an OpenMP team larger than the free cores waits at every barrier for a descheduled
    thread: on the busy 2-core development machine a 1.1k-token SmolLM2 pass took 11.4 s with 2 threads
    and 3.2 s with 1 (``full``: 23.6 s vs 3.4 s).
    """
    n = torch.get_num_threads()
    if device != "cpu" or not hasattr(os, "getloadavg"):
        return n, "torch default"
    load = os.getloadavg()[0]
    free = max(1, math.floor((os.cpu_count() or n) - load + 0.5))
    if free < n:
        return free, f"auto: load average {load:.1f} on {os.cpu_count()} cores leaves {free} free"
    return n, f"auto: torch default (load average {load:.1f})"


def _sync(lm: LoadedModel) -> None:
    if lm.device.type == "cuda":
        torch.cuda.synchronize(lm.device)


def _proc_status(field: str) -> int | None:
    """A ``kB`` field of /proc/self/status, in bytes."""
    try:
        m = re.search(rf"^{field}:\s+(\d+)\s+kB", Path("/proc/self/status").read_text(), re.M)
    except OSError:
        return None
    return int(m.group(1)) * 1024 if m else None


def fix_malloc_thresholds() -> bool:
    """glibc: serve every buffer over 64 KiB by mmap, returned to the OS on free (``mallopt``).

    With glibc's default, *dynamic* mmap threshold, a freed 4-10 MB buffer raises the threshold, later buffers
    of that size come from the heap, and fragments of it stay resident: the peak RSS then reports the
    allocator's history (measured: 2.4x the bare pass for the same live tensors) rather than what a method
    keeps alive. Fixing the thresholds makes RSS follow live memory. Call before the model is loaded.
    """
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(-3, 64 * 1024)) and bool(libc.mallopt(-1, 0))  # M_MMAP_THRESHOLD, M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        return False


def _reset_peak_rss() -> bool:
    """Return freed heap to the OS (glibc ``malloc_trim``), then reset the kernel's peak-RSS mark (VmHWM)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


@torch.inference_mode()
def eager_scores(scorer: HeadScorer, query: str, documents: Sequence[str]) -> torch.Tensor:
    """The naive way: one eager pass with ``output_attentions=True``, query rows of every head, doc sums."""
    prompt = _prompt(scorer, query, documents)
    ids = prompt.prefix_ids + prompt.query_ids
    P, Q = prompt.prefix_len, len(prompt.query_ids)
    out = scorer.base(input_ids=torch.tensor([ids], device=scorer.lm.device), output_attentions=True,
                      use_cache=False)
    rows = torch.stack([a[0, :, P:P + Q, :P].float().mean(1) for a in out.attentions]).cpu()  # [L, H, P]
    del out
    return mask_outliers_and_sum(rows.flatten(0, 1), prompt.doc_spans)


def rerank_pass(scorer: HeadScorer, items: Sequence[tuple[str, Sequence[str]]],
                heads: Sequence[tuple[int, int]] | None = None, batch_size: int = 1) -> list[Any]:
    """What ``Reranker`` runs for a head selection (None: all heads, ICR): its set's scores, no per-head ones."""
    return scorer.score_many(items, heads=heads, batch_size=batch_size, sets=[HeadSet.of(heads)], per_head=False)


def method_fn(name: str, scorer: HeadScorer, query: str, docs: list[str]) -> Callable[[], Any]:
    L, H = scorer.lm.num_layers, scorer.lm.num_heads
    if name == "bare":
        return lambda: scorer.bare_forward(query, docs)
    if name == "full":
        return lambda: rerank_pass(scorer, [(query, docs)])
    if name == "full_per_head":
        return lambda: scorer.score(query, docs)
    if name == "full_torch":  # the span rows by torch ops instead of the fused kernels (the same on CPU)
        def full_torch() -> Any:
            with capture.kernel("torch"):
                return rerank_pass(scorer, [(query, docs)])
        return full_torch
    if name == "static16":
        heads = static16_heads(L, H)
        return lambda: rerank_pass(scorer, [(query, docs)], heads)
    if name == "routed":
        fn = batch_scorer(scorer, "routed", shipped_router(scorer.lm), 1)
        return lambda: fn([(query, docs)])
    if name == "eager":
        return lambda: eager_scores(scorer, query, docs)
    raise ValueError(name)


def measure(name: str, scorer: HeadScorer, query: str, docs: list[str], warmup: int, repeats: int,
            eager_max_bytes: int | None, prompt_tokens: int) -> dict[str, Any]:
    """Warm-up, timed repeats and peak memory of one method, in this process."""
    lm = scorer.lm
    res: dict[str, Any] = {"method": name}
    if name == "eager" and lm.device.type == "cpu" and eager_max_bytes is not None:
        need = eager_bytes(lm.num_layers, lm.num_heads, prompt_tokens, torch.finfo(lm.dtype).bits // 8)
        if need > eager_max_bytes:
            res.update(status="OOM", note=f"not run: predicted {need / 2**30:.1f} GiB of attentions > "
                                          f"{eager_max_bytes / 2**30:.1f} GiB allowed (--eager-max-gb)")
            return res
    fn = method_fn(name, scorer, query, docs)
    cuda = lm.device.type == "cuda"
    if name == "eager":
        lm.model.set_attn_implementation("eager")
    times: list[float] = []
    before = peak = 0
    mem_how = ""
    try:
        for _ in range(warmup):  # outside the memory window: one-time allocations are no method's cost
            fn()
        gc.collect()
        _sync(lm)
        if cuda:
            torch.cuda.empty_cache()
            before = torch.cuda.memory_allocated(lm.device)
            torch.cuda.reset_peak_memory_stats(lm.device)
            mem_how = "cuda max_memory_allocated"
        else:
            mem_how = "VmHWM after clear_refs" if _reset_peak_rss() else "ru_maxrss (includes load: upper bound)"
            before = _proc_status("VmRSS") or 0
        for _ in range(repeats):
            _sync(lm)
            t = time.perf_counter()
            fn()
            _sync(lm)
            times.append(time.perf_counter() - t)
        if cuda:
            peak = torch.cuda.max_memory_allocated(lm.device)
        elif mem_how.startswith("VmHWM"):
            peak = _proc_status("VmHWM") or 0
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    except (torch.OutOfMemoryError, RuntimeError) as exc:  # CPU: RuntimeError "can't allocate memory"
        text = str(exc)
        oom = isinstance(exc, torch.OutOfMemoryError) or "allocate memory" in text or "out of memory" in text
        res.update(status="OOM" if oom else "error",
                   note=f"{type(exc).__name__}: {(text.splitlines() or [''])[0][:300]}")
        return res
    finally:
        if name == "eager":
            capture.install(lm.model)
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    res.update(status="ok", times=times, median_s=statistics.median(times), min_s=min(times),
               peak_mem_mb=max(peak - before, 0) / 2**20, mem_before_mb=before / 2**20, memory_method=mem_how)
    return res


# -- setup shared by the parent and the isolated children -----------------------------------------------------
def setup(cfg: dict[str, Any]) -> tuple[LoadedModel, HeadScorer]:
    ROUTER_PATH["path"] = cfg.get("router")
    if cfg.get("threads"):
        torch.set_num_threads(cfg["threads"])
    lm = build_lm(cfg["model"], cfg["device"], cfg["dtype"])
    max_doc = None if cfg["tokens_mode"] else cfg["max_doc_tokens"]
    return lm, HeadScorer(lm, max_doc_tokens=max_doc)


def make_case(cfg: dict[str, Any], scorer: HeadScorer, tokens: int | None) -> tuple[str, list[str], str]:
    """The query and documents of one prompt size, and where they came from."""
    if tokens is not None:
        q, docs = docs_for_tokens(scorer, tokens, cfg["docs_explicit"], cfg["doc_tokens"])
        return q, docs, f"synthetic, sized to ~{tokens} tokens"
    data = Path(cfg["data_root"])
    if not cfg["model"] or not cfg["model"].startswith("random:"):
        if (data / "scifact" / "corpus.jsonl").is_file():
            q, docs = SciFact(data).case(0, cfg["docs"], cfg["doc_words"])
            return q, docs, f"scifact test query 0 + corpus, {cfg['doc_words']} words/doc"
    docs = sized_docs(scorer, cfg["docs"], cfg["doc_tokens"], seed=0)
    return SYNTH_QUERY, docs, f"synthetic, ~{cfg['doc_tokens']} tokens/doc"


def _child(cfg: dict[str, Any], method: str, tokens: int | None) -> dict[str, Any]:
    """One method in a fresh process (``spawn``): load, build the prompt, then measure."""
    if cfg.get("phase") == "memory":
        fix_malloc_thresholds()
    lm, scorer = setup(cfg)
    q, docs, _ = make_case(cfg, scorer, tokens)
    n_tok = _prompt_tokens(scorer, q, docs)
    return measure(method, scorer, q, docs, cfg["warmup"], cfg["repeats"], cfg["eager_max_bytes"], n_tok)


def _prompt(scorer: HeadScorer, query: str, docs: Sequence[str]) -> Any:
    b = scorer.builder
    return b.prompt(query, docs)


def _prompt_tokens(scorer: HeadScorer, query: str, docs: list[str]) -> int:
    return _prompt(scorer, query, docs).length


def run_isolated(cfg: dict[str, Any], method: str, tokens: int | None) -> dict[str, Any]:
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    with ProcessPoolExecutor(max_workers=1, mp_context=mp.get_context("spawn")) as pool:
        try:
            return pool.submit(_child, cfg, method, tokens).result()
        except BrokenProcessPool as exc:  # killed: on Linux almost always the OOM killer
            return {"method": method, "status": "OOM", "note": f"child process died ({exc}); likely OOM-killed"}
        except Exception as exc:  # recorded, so one failing method never loses the others' numbers
            return {"method": method, "status": "error", "note": f"{type(exc).__name__}: {str(exc)[:300]}"}


# -- results --------------------------------------------------------------------------------------------------
def _ratio(a: Any, b: Any) -> Any:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b > 0:
        return a / b
    return "OOM" if "OOM" in (a, b) else None


def summarize(per: dict[str, dict[str, Any]], prompt_tokens: int, n_docs: int, source: str,
              L: int, H: int) -> dict[str, Any]:
    run: dict[str, Any] = {"prompt_tokens": prompt_tokens, "n_docs": n_docs, "docs_source": source}
    for m, r in per.items():
        run[f"{m}_s"] = r["median_s"] if r.get("status") == "ok" else r.get("status", "error")
    mem = {m: r["peak_mem_mb"] for m, r in per.items() if r.get("status") == "ok"}
    run["full_over_bare"] = _ratio(run.get("full_s"), run.get("bare_s"))
    run["full_torch_over_bare"] = _ratio(run.get("full_torch_s"), run.get("bare_s"))
    run["full_per_head_over_bare"] = _ratio(run.get("full_per_head_s"), run.get("bare_s"))
    run["routed_over_full"] = _ratio(run.get("routed_s"), run.get("full_s"))
    run["routed_over_bare"] = _ratio(run.get("routed_s"), run.get("bare_s"))
    run["static16_over_bare"] = _ratio(run.get("static16_s"), run.get("bare_s"))
    run["eager_over_bare"] = _ratio(run.get("eager_s"), run.get("bare_s"))
    run["peak_mem_mb"] = mem
    run["mem_before_mb"] = {m: r["mem_before_mb"] for m, r in per.items() if r.get("status") == "ok"}
    run["peak_mem_over_bare"] = _ratio(mem.get("full"), mem.get("bare"))
    run["peak_mem_over_bare_by_method"] = {m: _ratio(v, mem.get("bare")) for m, v in mem.items()}
    raw = {m: r["peak_mem_mb_default_malloc"] for m, r in per.items() if "peak_mem_mb_default_malloc" in r}
    if raw:  # the same peaks under glibc's dynamic mmap threshold (heap fragments included)
        run["peak_mem_mb_default_malloc"] = raw
        run["peak_mem_over_bare_default_malloc"] = _ratio(raw.get("full"), raw.get("bare"))
    if "eager" in per and per["eager"].get("status") != "ok":
        run["peak_mem_over_bare_by_method"]["eager"] = "OOM"
    run["times_s"] = {m: r.get("times") for m, r in per.items()}
    run["notes"] = {m: r["note"] for m, r in per.items() if r.get("note")}
    run["memory_method"] = sorted({r["memory_method"] for r in per.values() if r.get("memory_method")})
    run["heads"] = {"static16": static16_heads(L, H), "routed": routed_heads(L, H)}
    return run


def machine_info(device: str) -> dict[str, Any]:
    import transformers

    cpu = platform.processor() or ""
    try:
        m = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M)
        cpu = m.group(1).strip() if m else cpu
    except OSError:
        pass
    info: dict[str, Any] = {
        "cpu": cpu, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
        "platform": platform.platform(), "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "loadavg_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    mem = _meminfo("MemTotal")
    if mem:
        info["ram_gb"] = round(mem / 2**30, 1)
    if device.startswith("cuda") and torch.cuda.is_available():
        p = torch.cuda.get_device_properties(torch.device(device))
        info.update(gpu=p.name, gpu_mem_gb=round(p.total_memory / 2**30, 1), cuda=torch.version.cuda)
    return info


def _meminfo(field: str) -> int | None:
    try:
        m = re.search(rf"^{field}:\s+(\d+)\s+kB", Path("/proc/meminfo").read_text(), re.M)
    except OSError:
        return None
    return int(m.group(1)) * 1024 if m else None


def batch_scorer(scorer: HeadScorer, method: str, router: Router | None, batch_size: int
                 ) -> Callable[[list[tuple[str, list[str]]]], Any]:
    """Scores a list of queries ``batch_size`` prompts per pass, as ``Reranker.rerank_many`` does. ``routed``: each
    query's embedding pass and routing, then one pass per batch computing the union of the batch's routed heads
    and aggregating each query's own set."""
    L, H = scorer.lm.num_layers, scorer.lm.num_heads
    if method != "routed":
        heads = {"full": None, "static16": static16_heads(L, H)}[method]
        return lambda items: rerank_pass(scorer, items, heads, batch_size)

    def routed(items: list[tuple[str, list[str]]]) -> list[Any]:
        out = []
        for k in range(0, len(items), batch_size):
            batch = items[k:k + batch_size]
            if router is None:
                sets = [HeadSet.of(routed_heads(L, H))] * len(batch)
            else:
                cfg = router.config
                sets = [HeadSet.of(r.heads, r.weights) for r in
                        (router.route(scorer.query_embedding(q, cfg.embed_layer, cfg.pooling)) for q, _ in batch)]
            union = sorted({h for hs in sets for h in hs.heads or ()})
            out += scorer.score_many(batch, heads=union, batch_size=batch_size, sets=list(dict.fromkeys(sets)),
                                     per_head=False)
        return out
    return routed


def throughput(cfg: dict[str, Any], lm: LoadedModel, scorer: HeadScorer, sf: SciFact | None,
               save: Callable[[dict[str, Any]], None] = lambda _: None) -> dict[str, Any]:
    """Queries per second at each candidate count, method and batch size (prompts per forward pass)."""
    router = shipped_router(lm)
    out: dict[str, Any] = {"queries": cfg["queries"], "batch_sizes": cfg["batch_sizes"],
                           "mode": "batch_size prompts per pass (1: one query at a time)"}
    n = cfg["queries"]
    for c in cfg["candidates"]:
        cases = []
        for i in range(n + max(cfg["batch_sizes"])):  # the first max(batch) cases warm up, the rest are timed
            if sf is not None:
                cases.append(sf.case(i + 1, c, cfg["doc_words"]))
            else:
                cases.append((SYNTH_QUERY, sized_docs(scorer, c, cfg["doc_tokens"], seed=1000 + i)))
        warm, timed = cases[:-n], cases[-n:]
        row: dict[str, Any] = {}
        for m in cfg["throughput_methods"]:
            for bs in cfg["batch_sizes"]:
                fn = batch_scorer(scorer, m, router, bs)
                fn(warm[:bs])
                _sync(lm)
                t = time.perf_counter()
                r = fn(timed)
                _sync(lm)
                dt = time.perf_counter() - t
                key = m if bs == 1 else f"{m}@{bs}"
                row[key] = {"qps": n / dt, "s_per_query": dt / n, "batch_size": bs,
                            "windows": len(r[0].windows), "prompt_tokens": r[0].prompt_tokens}
                if lm.device.type == "cuda":
                    row[key]["gpu_busy"] = gpu_busy(fn, timed[:bs], dt / n)
                out[str(c)] = row
                save(out)
    return out


def gpu_busy(fn: Callable[[list], Any], items: list, s_per_query: float) -> float | None:
    """Share of the (unprofiled) time per query the GPU spends in kernels: kernel time per query of ``fn`` over
    ``items`` (torch.profiler, device activity only), over ``s_per_query``. Near 1: the GPU is busy and more
    batching cannot add much; far below: launch- or host-bound, where batching pays."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    try:
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            fn(items)
            torch.cuda.synchronize()
        kernel_us = sum(e.self_device_time_total for e in prof.key_averages()
                        if e.device_type == DeviceType.CUDA and not e.is_user_annotation)
    except Exception as e:  # a profiler that cannot see the device: say so, do not fail the run
        print(f"gpu_busy: profiler unavailable ({e})", file=sys.stderr)
        return None
    return round(kernel_us / 1e6 / len(items) / s_per_query, 3)


def format_table(result: dict[str, Any]) -> str:
    lines = [f"model {result['config']['model']}  device {result['config']['device']}  "
             f"threads {result['machine']['torch_threads']}  {result['machine']['cpu']}  "
             f"torch {result['machine']['torch']}  transformers {result['machine']['transformers']}"]
    for run in result["runs"]:
        lines.append(f"\nprompt {run['prompt_tokens']} tokens, {run['n_docs']} docs ({run['docs_source']})")
        lines.append(f"{'method':<10}{'median s':>10}{'x bare':>9}{'peak MB':>10}{'mem x bare':>12}")
        for m in result["config"]["methods"]:
            s = run.get(f"{m}_s")
            xb = _ratio(s, run.get("bare_s"))
            mem = run["peak_mem_mb"].get(m)
            mx = run["peak_mem_over_bare_by_method"].get(m)
            lines.append(f"{m:<10}{_cell(s, '.3f'):>10}{_cell(xb, '.2f'):>9}{_cell(mem, '.0f'):>10}"
                         f"{_cell(mx, '.2f'):>12}")
        lines.append(f"full/bare {_fmt(run['full_over_bare'])}  routed/full {_fmt(run['routed_over_full'])}  "
                     f"static16/bare {_fmt(run['static16_over_bare'])}  eager/bare {_fmt(run['eager_over_bare'])}  "
                     f"peak mem full/bare {_fmt(run['peak_mem_over_bare'])}")
        for m, note in run["notes"].items():
            lines.append(f"  {m}: {note}")
    if "throughput" in result:
        tp = result["throughput"]
        lines.append(f"\nthroughput ({tp['mode']}, {tp['queries']} queries)")
        for c in result["config"]["candidates"]:
            cells = "  ".join(f"{m} {v['qps']:.3f} q/s ({v['windows']} win, {v['prompt_tokens']} tok"
                              f"{', GPU busy ' + format(v['gpu_busy'], '.2f') if v.get('gpu_busy') else ''})"
                              for m, v in tp[str(c)].items())
            lines.append(f"  {c:>4} candidates: {cells}")
    return "\n".join(lines)


def _cell(v: Any, spec: str) -> str:
    return format(v, spec) if isinstance(v, (int, float)) else str(v or "-")


def _fmt(v: Any) -> str:
    return f"{v:.2f}" if isinstance(v, (int, float)) else str(v)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model spec for load_model, or random:<shape> "
                                                  f"({', '.join(RANDOM_SHAPES)}); default: the embedded default")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    ap.add_argument("--dtype", default=None, help="float32 / bfloat16 (default: fp32 on CPU, bf16 on CUDA)")
    ap.add_argument("--methods", nargs="+", default=None, choices=METHODS,
                    help="default: all (full_torch on CUDA only, where it differs from full)")
    ap.add_argument("--no-methods", action="store_true", help="skip the per-method timings (e.g. throughput only)")
    ap.add_argument("--docs", type=int, default=None, help="documents per prompt (default 20, --quick 6; with "
                                                           "--tokens: round(T / (doc_tokens + 6)))")
    ap.add_argument("--doc-words", type=int, default=120, help="SciFact documents are cut to this many words")
    ap.add_argument("--doc-tokens", type=int, default=170, help="size of synthetic documents, in tokens")
    ap.add_argument("--max-doc-tokens", type=int, default=300, help="scorer's per-document truncation")
    ap.add_argument("--tokens", type=int, nargs="+", default=None, help="prompt sizes (synthetic documents)")
    ap.add_argument("--data-root", default=str(ROOT.parent / "shared" / "data"))
    ap.add_argument("--repeats", type=int, default=None, help="timed calls per method (default 5; --quick 2)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: 6 documents (~1.1k tokens), 2 repeats, in-process memory, "
                         "3 throughput queries")
    ap.add_argument("--threads", default="auto",
                    help="torch threads, or 'auto' (default): fewer on a busy CPU, see auto_threads()")
    ap.add_argument("--isolate", action=argparse.BooleanOptionalAction, default=None,
                    help="each method in a fresh spawned process (default: on for CPU, off for CUDA)")
    ap.add_argument("--eager-max-gb", type=float, default=None,
                    help="CPU: do not start eager above this predicted size (default: 80%% of MemAvailable)")
    ap.add_argument("--throughput", action="store_true", help="queries/s at --candidates documents")
    ap.add_argument("--candidates", type=int, nargs="+", default=[20, 100])
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1],
                    help="throughput: prompts per forward pass, each measured (default 1)")
    ap.add_argument("--queries", type=int, default=None, help="throughput queries (default 10; --quick 3)")
    ap.add_argument("--throughput-methods", nargs="+", default=["full", "routed"],
                    choices=["full", "static16", "routed"])
    ap.add_argument("--router", default=None,
                    help="routed: this router file, or a shipped variant (bce, fs, fast), in place of the shipped one")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    ap.add_argument("--out", default=None, help="JSON path (default results/speed/<name>.json)")
    ap.add_argument("--default-malloc", action="store_true",
                    help="CPU: keep glibc's dynamic mmap threshold (peak RSS then includes heap fragmentation)")
    ap.add_argument("--name", default=None, help="file name under results/speed (default from model/device)")
    return ap.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.threads == "auto":
        threads, why = auto_threads(device)
    else:
        threads, why = int(args.threads), "--threads"
    torch.set_num_threads(threads)
    malloc = "fixed" if device == "cpu" and not args.default_malloc else "default"
    isolate = args.isolate if args.isolate is not None else (device == "cpu" and not args.quick)
    eager_max = (int(args.eager_max_gb * 2**30) if args.eager_max_gb is not None
                 else int(0.8 * (_meminfo("MemAvailable") or 0)) or None)
    cfg: dict[str, Any] = {
        "model": args.model, "device": device, "dtype": args.dtype, "threads": threads, "threads_reason": why,
        "tokens_mode": args.tokens is not None, "max_doc_tokens": args.max_doc_tokens,
        "docs": args.docs or (6 if args.quick else 20), "docs_explicit": args.docs, "doc_words": args.doc_words,
        "doc_tokens": args.doc_tokens, "data_root": args.data_root,
        "repeats": args.repeats or (2 if args.quick else 5), "warmup": args.warmup,
        "eager_max_bytes": eager_max if device == "cpu" else None,
        "queries": args.queries or (3 if args.quick else 10), "candidates": args.candidates,
        "throughput_methods": args.throughput_methods, "batch_sizes": args.batch_sizes,
        "methods": [] if args.no_methods else list(args.methods or [m for m in METHODS if m != "full_torch"
                                                                         or device.startswith("cuda")]),
        "isolate": isolate, "malloc": malloc, "router": args.router,
    }
    slug = (args.model or "default").replace("random:", "random-").replace("/", "_")
    name = args.name or f"{slug}-{device}{'-quick' if args.quick else ''}{'-throughput' if args.throughput else ''}"
    out = Path(args.out) if args.out else ROOT / "results" / "speed" / f"{name}.json"
    result: dict[str, Any] = {"machine": machine_info(device), "config": cfg, "runs": []}
    t_start = time.perf_counter()

    # The parent always loads: it builds the prompts (and prompt_tokens) and, without --isolate, runs everything.
    lm, scorer = setup(cfg)
    L, H = lm.num_layers, lm.num_heads
    cfg.update(model_name=lm.name, num_layers=L, num_heads=H, num_kv_heads=lm.num_kv_heads,
               dtype=str(lm.dtype).replace("torch.", ""), model_shape=model_shape(lm),
               params_b=round(sum(p.numel() for p in lm.model.parameters()) / 1e9, 3))

    sizes: list[int | None] = list(args.tokens) if args.tokens else [None]
    cases = []
    for tokens in sizes if cfg["methods"] else []:
        q, docs, source = make_case(cfg, scorer, tokens)
        cases.append((tokens, q, docs, source, _prompt_tokens(scorer, q, docs)))

    def run_methods(case: tuple, run_cfg: dict[str, Any]) -> dict[str, dict[str, Any]]:
        tokens, q, docs, _, n_tok = case
        return {m: run_isolated(run_cfg, m, tokens) if isolate else
                measure(m, scorer, q, docs, run_cfg["warmup"], run_cfg["repeats"], cfg["eager_max_bytes"], n_tok)
                for m in cfg["methods"]}

    def record(per: dict[str, dict[str, Any]], case: tuple) -> dict[str, Any]:
        _, q, docs, source, n_tok = case
        run = summarize(per, n_tok, len(docs), source, L, H)
        run["heads"]["routed"] = routed_source(scorer, shipped_router(lm), q)
        return run

    # Phase 1, times (and memory) under glibc's defaults; phase 2 (CPU), memory alone with fixed thresholds.
    pers = []
    for case in cases:
        pers.append(run_methods(case, cfg))
        result["runs"].append(record(pers[-1], case))
        _write(out, result, t_start)
        if not args.json:
            print(f"[{case[4]} tokens timed, {time.perf_counter() - t_start:.0f} s]", file=sys.stderr, flush=True)
    if malloc == "fixed" and cases and not isolate and not fix_malloc_thresholds():
        cfg["malloc"] = malloc = "default (mallopt unavailable: no memory phase)"
    if malloc == "fixed" and cases:
        mem_cfg = {**cfg, "phase": "memory", "warmup": 1, "repeats": 1}
        for i, (per, case) in enumerate(zip(pers, cases)):
            for m, r in run_methods(case, mem_cfg).items():
                if r.get("status") == "ok" and per[m].get("status") == "ok":
                    per[m].update(peak_mem_mb_default_malloc=per[m]["peak_mem_mb"], peak_mem_mb=r["peak_mem_mb"],
                                  mem_before_mb=r["mem_before_mb"])
            result["runs"][i] = record(per, case)
            _write(out, result, t_start)

    if args.throughput:
        sf = None
        if not (args.model or "").startswith("random:") and (Path(args.data_root) / "scifact").is_dir():
            sf = SciFact(Path(args.data_root))
        result["throughput"] = throughput(cfg, lm, scorer, sf,
                                          lambda tp: _write(out, {**result, "throughput": tp}, t_start))
    if len(result["runs"]) == 1:
        result = {**result["runs"][0], **result}
    _write(out, result, t_start)
    if args.json:
        print(json.dumps(result, indent=1, default=str))
    else:
        print(format_table(result))
        print(f"\nwritten {out}")
    return result


def _write(out: Path, result: dict[str, Any], t_start: float) -> None:
    result["machine"]["loadavg_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    result["wall_s"] = round(time.perf_counter() - t_start, 1)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".tmp")
    tmp.write_text(json.dumps(result, indent=1, default=str) + "\n")
    tmp.replace(out)


if __name__ == "__main__":
    main()
