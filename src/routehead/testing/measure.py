"""Timing and peak memory of one pass mode (:mod:`routehead.testing.passes`), in this process or a fresh one.

Times: median over the repeats after untimed warm-up calls (CUDA synchronised). Peak memory above what was held
after the warm-up: on CUDA ``max_memory_allocated`` minus ``memory_allocated`` before; on CPU the kernel's
peak-RSS mark (``VmHWM``), reset through ``/proc/self/clear_refs`` after glibc's ``malloc_trim`` (or
``ru_maxrss``, an upper bound that includes the model load, where the mark cannot be reset). See
``bench/speed.py`` for how the two CPU phases (glibc's defaults, then fixed mmap thresholds) use them.
"""

from __future__ import annotations

import datetime as _dt
import gc
import math
import os
import platform
import re
import resource
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from routehead.engine import capture
from routehead.engine.model import LoadedModel
from routehead.engine.scorer import HeadScorer
from routehead.testing.passes import Skipped, eager_bytes, mode_call, routed_heads, static16_heads
from routehead.testing.random_models import build_lm
from routehead.testing.workload import SYNTH_QUERY, SciFact, docs_for_tokens, sized_docs


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


def sync(lm: LoadedModel) -> None:
    if lm.device.type == "cuda":
        torch.cuda.synchronize(lm.device)


def kb_field(path: str, field: str) -> int | None:
    """A ``kB`` field of a /proc file (``/proc/self/status``, ``/proc/meminfo``), in bytes."""
    try:
        m = re.search(rf"^{field}:\s+(\d+)\s+kB", Path(path).read_text(), re.M)
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


def reset_peak_rss() -> bool:
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


def measure(mode: str, scorer: HeadScorer, query: str, docs: list[str], warmup: int, repeats: int,
            eager_max_bytes: int | None, prompt_tokens: int, router: str | None = None) -> dict[str, Any]:
    """Warm-up, timed repeats and peak memory of one mode, in this process. On CPU the eager pass is not started
    when its predicted attentions exceed ``eager_max_bytes`` (recorded as ``OOM``); a mode the model has no
    shipped asset for is recorded as ``skipped`` with the reason in ``note``."""
    lm = scorer.lm
    res: dict[str, Any] = {"method": mode}
    if mode == "eager" and lm.device.type == "cpu" and eager_max_bytes is not None:
        need = eager_bytes(lm.num_layers, lm.num_heads, prompt_tokens, torch.finfo(lm.dtype).bits // 8)
        if need > eager_max_bytes:
            res.update(status="OOM", note=f"not run: predicted {need / 2**30:.1f} GiB of attentions > "
                                          f"{eager_max_bytes / 2**30:.1f} GiB allowed (--eager-max-gb)")
            return res
    try:
        fn = mode_call(mode, scorer, query, docs, router)
    except Skipped as exc:
        res.update(status="skipped", note=f"skipped: {exc}")
        return res
    cuda = lm.device.type == "cuda"
    if mode == "eager":
        lm.model.set_attn_implementation("eager")
    times: list[float] = []
    before = peak = 0
    try:
        for _ in range(warmup):  # outside the memory window: one-time allocations are no method's cost
            fn()
        gc.collect()
        sync(lm)
        if cuda:
            torch.cuda.empty_cache()
            before = torch.cuda.memory_allocated(lm.device)
            torch.cuda.reset_peak_memory_stats(lm.device)
            mem_how = "cuda max_memory_allocated"
        else:
            mem_how = "VmHWM after clear_refs" if reset_peak_rss() else "ru_maxrss (includes load: upper bound)"
            before = kb_field("/proc/self/status", "VmRSS") or 0
        for _ in range(repeats):
            sync(lm)
            t = time.perf_counter()
            fn()
            sync(lm)
            times.append(time.perf_counter() - t)
        if cuda:
            peak = torch.cuda.max_memory_allocated(lm.device)
        elif mem_how.startswith("VmHWM"):
            peak = kb_field("/proc/self/status", "VmHWM") or 0
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    except (torch.OutOfMemoryError, RuntimeError) as exc:  # CPU: RuntimeError "can't allocate memory"
        text = str(exc)
        oom = isinstance(exc, torch.OutOfMemoryError) or "allocate memory" in text or "out of memory" in text
        res.update(status="OOM" if oom else "error",
                   note=f"{type(exc).__name__}: {(text.splitlines() or [''])[0][:300]}")
        return res
    finally:
        if mode == "eager":
            capture.install(lm.model)
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    res.update(status="ok", times=times, median_s=statistics.median(times), min_s=min(times),
               peak_mem_mb=max(peak - before, 0) / 2**20, mem_before_mb=before / 2**20, memory_method=mem_how)
    return res


# -- one run's configuration, shared by the parent and the isolated children ---------------------------------
def setup(cfg: dict[str, Any]) -> tuple[LoadedModel, HeadScorer]:
    """The model and scorer of a run (``cfg``: model, device, dtype, threads, tokens_mode, max_doc_tokens)."""
    if cfg.get("threads"):
        torch.set_num_threads(cfg["threads"])
    lm = build_lm(cfg["model"], cfg["device"], cfg["dtype"])
    return lm, HeadScorer(lm, max_doc_tokens=None if cfg["tokens_mode"] else cfg["max_doc_tokens"])


def make_case(cfg: dict[str, Any], scorer: HeadScorer, tokens: int | None) -> tuple[str, list[str], str]:
    """The query and documents of one prompt size, and where they came from: a synthetic prompt of about
    ``tokens`` tokens; else SciFact's first test query (real models, when the data is there); else synthetic
    documents of ``doc_tokens`` tokens."""
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


def prompt_tokens(scorer: HeadScorer, query: str, docs: list[str]) -> int:
    return scorer.builder.prompt(query, docs).length


def measure_case(cfg: dict[str, Any], mode: str, tokens: int | None) -> dict[str, Any]:
    """One mode in a fresh process (``spawn``): load, build the prompt, then measure."""
    if cfg.get("phase") == "memory":
        fix_malloc_thresholds()
    _, scorer = setup(cfg)
    q, docs, _ = make_case(cfg, scorer, tokens)
    return measure(mode, scorer, q, docs, cfg["warmup"], cfg["repeats"], cfg["eager_max_bytes"],
                   prompt_tokens(scorer, q, docs), cfg.get("router"))


def run_isolated(cfg: dict[str, Any], mode: str, tokens: int | None) -> dict[str, Any]:
    """:func:`measure_case` in a child process; a child killed (on Linux almost always by the OOM killer) or
    failing is recorded, so one mode never loses the others' numbers."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    with ProcessPoolExecutor(max_workers=1, mp_context=mp.get_context("spawn")) as pool:
        try:
            return pool.submit(measure_case, cfg, mode, tokens).result()
        except BrokenProcessPool as exc:
            return {"method": mode, "status": "OOM", "note": f"child process died ({exc}); likely OOM-killed"}
        except Exception as exc:
            return {"method": mode, "status": "error", "note": f"{type(exc).__name__}: {str(exc)[:300]}"}


# -- results --------------------------------------------------------------------------------------------------
def ratio(a: Any, b: Any) -> Any:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b > 0:
        return a / b
    return "OOM" if "OOM" in (a, b) else None


def summarize(per: dict[str, dict[str, Any]], n_tokens: int, n_docs: int, source: str, L: int, H: int
              ) -> dict[str, Any]:
    """One prompt size's record: every mode's median time, the ratios, peak memory, notes and head rules."""
    run: dict[str, Any] = {"prompt_tokens": n_tokens, "n_docs": n_docs, "docs_source": source}
    for m, r in per.items():
        run[f"{m}_s"] = r["median_s"] if r.get("status") == "ok" else r.get("status", "error")
    mem = {m: r["peak_mem_mb"] for m, r in per.items() if r.get("status") == "ok"}
    for a, b in (("full", "bare"), ("full_torch", "bare"), ("full_per_head", "bare"), ("routed", "full"),
                 ("routed", "bare"), ("static16", "bare"), ("eager", "bare")):
        run[f"{a}_over_{b}"] = ratio(run.get(f"{a}_s"), run.get(f"{b}_s"))
    for b in ("full", "bare"):  # every mode's median over full's and over bare's (None where either did not run)
        run[f"over_{b}_by_method"] = {m: ratio(run[f"{m}_s"], run.get(f"{b}_s")) for m in per}
    run["peak_mem_mb"] = mem
    run["mem_before_mb"] = {m: r["mem_before_mb"] for m, r in per.items() if r.get("status") == "ok"}
    run["peak_mem_over_bare"] = ratio(mem.get("full"), mem.get("bare"))
    run["peak_mem_over_bare_by_method"] = {m: ratio(v, mem.get("bare")) for m, v in mem.items()}
    raw = {m: r["peak_mem_mb_default_malloc"] for m, r in per.items() if "peak_mem_mb_default_malloc" in r}
    if raw:  # the same peaks under glibc's dynamic mmap threshold (heap fragments included)
        run["peak_mem_mb_default_malloc"] = raw
        run["peak_mem_over_bare_default_malloc"] = ratio(raw.get("full"), raw.get("bare"))
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
    mem = kb_field("/proc/meminfo", "MemTotal")
    if mem:
        info["ram_gb"] = round(mem / 2**30, 1)
    if device.startswith("cuda") and torch.cuda.is_available():
        p = torch.cuda.get_device_properties(torch.device(device))
        info.update(gpu=p.name, gpu_mem_gb=round(p.total_memory / 2**30, 1), cuda=torch.version.cuda)
    return info


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


def pass_flops(lm: LoadedModel, n_tokens: int) -> dict[str, float]:
    """Useful floating-point work of one plain pass over ``n_tokens`` (all layers, no LM head): what the
    hardware must do at least, so achieved GFLOP/s compares with the cores' peak.

    Linear layers: ``2 T`` per weight of the decoder layers' ``nn.Linear`` modules. Attention: ``4 d`` per
    (query, key) pair a head may see (``QK^T`` and ``PV``): ``T (T + 1) / 2`` pairs per head in a causal layer,
    ``sum_i min(i + 1, w)`` in a sliding-window one. Norms, activations and rotary embeddings are left out
    (under 3 % at these sizes)."""
    from routehead.engine.layers import decoder_layers

    T = n_tokens
    layers = decoder_layers(lm.model)
    linear = sum(m.weight.numel() for layer in layers for m in layer.modules() if isinstance(m, torch.nn.Linear))
    attn = 0.0
    for layer in layers:
        mod = getattr(layer, "self_attn", None)
        d = getattr(mod, "head_dim", None) or lm.config.hidden_size // lm.num_heads
        w = getattr(mod, "sliding_window", None)
        pairs = T * (T + 1) / 2 if not w or w >= T else w * (w + 1) / 2 + (T - w) * w
        attn += 4 * d * lm.num_heads * pairs
    return {"linear": 2.0 * T * linear, "attention": attn, "total": 2.0 * T * linear + attn}


def cpu_peak_gflops(threads: int, dtype: str) -> dict[str, Any]:
    """The cores' peak for ``dtype`` matmuls: ``threads x GHz x FLOP per cycle``, FLOP per cycle from the widest
    FMA the CPU has (two FMA units: AVX-512 64, AVX2 32, else 16 in float32; native bfloat16 dot products
    (AVX512-BF16) double AVX-512's; AMX is left out, so its figure is a lower bound). GHz: the highest
    ``cpu MHz`` /proc/cpuinfo shows (a boost clock under load may be higher, so the peak is approximate)."""
    from routehead.engine.model import cpu_flags, cpu_native_bf16

    flags = cpu_flags()
    try:
        mhz = max(float(x) for x in re.findall(r"^cpu MHz\s*:\s*([\d.]+)", Path("/proc/cpuinfo").read_text(), re.M))
    except (OSError, ValueError):
        return {"peak_gflops": None, "why": "no cpu MHz in /proc/cpuinfo"}
    per_cycle = 64 if "avx512f" in flags else 32 if {"avx2", "fma"} <= flags else 16
    native = dtype == "bfloat16" and cpu_native_bf16(flags)
    if native:
        per_cycle *= 2
    return {"peak_gflops": round(threads * mhz / 1000 * per_cycle, 1), "ghz": round(mhz / 1000, 2),
            "flop_per_cycle": per_cycle, "native_bf16": cpu_native_bf16(flags),
            "isa": "avx512" if "avx512f" in flags else "avx2" if "avx2" in flags else "other"}
