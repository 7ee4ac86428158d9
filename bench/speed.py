"""Speed and peak memory of head scoring against a plain forward pass and against the naive eager way.

    python bench/speed.py --quick --json                     # CPU smoke run, default model (SmolLM2-135M)
    python bench/speed.py                                    # 20 SciFact docs, 5 repeats, isolated, table
    python bench/speed.py --model random:llama-3.1-8b --device cuda --tokens 2048 8192 16384 32768
    python bench/speed.py --model random:llama-3.1-8b --device cuda --throughput --no-methods --batch-sizes 1 4
    python bench/speed.py --model random:tiny --tokens 256 --no-isolate    # seconds, for tests

Methods, each timed per query (tokenization included) on the same prompt, with the decoder layers its scoring
pass runs (``layers_run``: the deepest layer it reads + 1, of ``num_layers``; the pass exits after that layer):

- ``bare``: :meth:`HeadScorer.bare_forward`, one plain SDPA pass over prefix + query, all layers: the floor. A
  list over the model's budget is scored in windows (``window_tokens``, one entry per window); ``bare`` then runs
  one plain pass per window, as the scoring methods do (``eager`` alone runs the whole prompt in one pass).
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
- ``static``, ``single``, ``core``, ``layers``: the registered methods of those names with the asset shipped for
  the model, run by :func:`rerank_pass` as ``static16``: ``static`` the QRHead set
  (``assets/heads-<model>.json``), ``single`` its best head alone, ``core`` the CoRe set
  (``heads-<model>-core.json``), ``layers`` every head of the Selective-ICR layer window
  (``layers-<model>.json``). Each exits after the deepest layer it reads (SmolLM2, 30 layers: 24, 18, 22 and 19
  layers run); the heads (and window) are in ``heads.<mode>``. Like ``routed`` they score the bench's prompt
  (``--max-doc-tokens``), not the prompt settings stored with the asset that ``Reranker`` would apply, so every
  mode reads the same tokens. A model without the asset (any ``random:`` model) records ``"skipped"`` as the
  time, no ratio, and the reason in ``notes``.
- ``routed``: for a model with a shipped router (SmolLM2, Gemma-3-270M), RouteHead's real path: the
  query-embedding pass, routing, then :func:`rerank_pass` with the routed heads only (exit after the deepest); the
  heads it routed are in ``heads.routed``. For other models a routed-style set of 4 heads whose deepest
  layer sits at 2/3 of the depth. Rule: ``d = round(2 L / 3)``; layers ``round(j * (d - 1) / 3)`` and heads
  ``(j * H) // 4`` for ``j = 0..3`` (so the deepest head is in layer ``d - 1`` and ``d`` of ``L`` layers run).
  SmolLM2 (30 x 9): ``(0,0) (6,2) (13,4) (19,6)``; Llama-3.1-8B (32 x 32): ``(0,0) (7,8) (13,16) (20,24)``.
  Its ``layers_run`` is that of the heads routed for the prompt's query (the short query-embedding pass before
  it, over the query alone up to the router's ``embed_layer``, is timed but not counted).
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

Times: median over ``--repeats`` after ``--warmup`` untimed calls (CUDA synchronised), in ``<mode>_s``. Ratios:
every mode's median over ``full``'s and over ``bare``'s in ``over_full_by_method`` and ``over_bare_by_method``
(None where either did not run), and as named keys ``full_over_bare``, ``full_per_head_over_bare``,
``full_torch_over_bare``, ``routed_over_full``, ``routed_over_bare``, ``static16_over_bare``, ``eager_over_bare``.

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

The passes and head rules are in :mod:`routehead.testing.passes` (each timed selection is a registered method:
``full`` is ``icr``, ``static16`` a ``static`` set, ``routed`` ``route``), the measurements in
:mod:`routehead.testing.measure`, the random models in :mod:`routehead.testing.random_models` and the
documents in :mod:`routehead.testing.workload`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from routehead.engine.model import LoadedModel  # noqa: E402
from routehead.engine.scorer import HeadScorer  # noqa: E402
from routehead.testing.measure import (  # noqa: E402
    auto_threads,
    cpu_peak_gflops,
    fix_malloc_thresholds,
    gpu_busy,
    kb_field,
    machine_info,
    make_case,
    measure,
    pass_flops,
    prompt_tokens,
    ratio,
    run_isolated,
    setup,
    summarize,
    sync,
)
from routehead.testing.passes import (  # noqa: E402
    MODES,
    SHIPPED_MODES,
    Skipped,
    layers_run,
    mode_method,
    rerank_pass,
    routed_source,
)
from routehead.testing.random_models import RANDOM_SHAPES, model_shape  # noqa: E402
from routehead.testing.workload import SYNTH_QUERY, SciFact, sized_docs  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def throughput(cfg: dict[str, Any], lm: LoadedModel, scorer: HeadScorer, sf: SciFact | None,
               save: Callable[[dict[str, Any]], None] = lambda _: None) -> dict[str, Any]:
    """Queries per second at each candidate count, method and batch size (prompts per forward pass)."""
    out: dict[str, Any] = {"queries": cfg["queries"], "batch_sizes": cfg["batch_sizes"],
                           "mode": "batch_size prompts per pass (1: one query at a time)"}
    n = cfg["queries"]
    methods = {m: mode_method(m, lm, cfg["router"]) for m in cfg["throughput_methods"]}
    for c in cfg["candidates"]:
        cases = []
        for i in range(n + max(cfg["batch_sizes"])):  # the first max(batch) cases warm up, the rest are timed
            if sf is not None:
                cases.append(sf.case(i + 1, c, cfg["doc_words"]))
            else:
                cases.append((SYNTH_QUERY, sized_docs(scorer, c, cfg["doc_tokens"], seed=1000 + i)))
        warm, timed = cases[:-n], cases[-n:]
        row: dict[str, Any] = {}
        for m, method in methods.items():
            for bs in cfg["batch_sizes"]:
                def fn(items: list, method=method, bs=bs) -> list:
                    return rerank_pass(scorer, items, method, bs)
                fn(warm[:bs])
                sync(lm)
                t = time.perf_counter()
                r = fn(timed)
                sync(lm)
                dt = time.perf_counter() - t
                key = m if bs == 1 else f"{m}@{bs}"
                row[key] = {"qps": n / dt, "s_per_query": dt / n, "batch_size": bs,
                            "windows": len(r[0].windows), "prompt_tokens": r[0].prompt_tokens}
                if lm.device.type == "cuda":
                    row[key]["gpu_busy"] = gpu_busy(fn, timed[:bs], dt / n)
                out[str(c)] = row
                save(out)
    return out


def add_flops(run: dict[str, Any], lm: LoadedModel, windows: list[int], device: str, cfg: dict[str, Any]) -> None:
    """The passes' useful work (one plain pass per window of ``windows`` tokens), the GFLOP/s bare and full
    achieve with it (full does a little more: the "N/A" rows and span rows), and on CPU the cores' peak: how far
    the pass is from the physical limit."""
    per = [pass_flops(lm, t) for t in windows]
    flops = {k: sum(f[k] for f in per) for k in per[0]}
    run["flops"] = flops
    run["gflops"] = {m: round(flops["total"] / run[f"{m}_s"] / 1e9, 1) for m in ("bare", "full")
                     if isinstance(run.get(f"{m}_s"), float)}
    if device == "cpu":
        run["peak"] = cpu_peak_gflops(cfg["threads"], cfg["dtype"])


def add_depth(run: dict[str, Any], scorer: HeadScorer, query: str, docs: list[str], cfg: dict[str, Any]) -> None:
    """Each method's ``layers_run`` for ``query`` (of ``num_layers``; None for a skipped mode, whose reason is in
    ``notes``) and the heads (and window) of the shipped-asset modes."""
    run["num_layers"], run["layers_run"] = scorer.lm.num_layers, {}
    for m in cfg["methods"]:
        try:
            run["layers_run"][m] = layers_run(m, scorer, query, cfg["router"], docs)
        except Skipped:
            run["layers_run"][m] = None
        if m in SHIPPED_MODES:
            try:
                info = mode_method(m, scorer.lm).info()
                run["heads"][m] = {k: info[k] for k in ("heads", "window") if k in info}
            except Skipped:
                run["heads"][m] = None


def format_table(result: dict[str, Any]) -> str:
    lines = [f"model {result['config']['model']}  device {result['config']['device']}  "
             f"threads {result['machine']['torch_threads']}  {result['machine']['cpu']}  "
             f"torch {result['machine']['torch']}  transformers {result['machine']['transformers']}"]
    for run in result["runs"]:
        lines.append(f"\nprompt {run['prompt_tokens']} tokens, {run['n_docs']} docs ({run['docs_source']})")
        if len(run.get("window_tokens") or []) > 1:
            lines.append(f"scored in {len(run['window_tokens'])} windows of {run['window_tokens']} tokens "
                         f"(over the budget); bare runs the same windows")
        lines.append(f"{'method':<14}{'median s':>10}{'layers':>8}{'x full':>8}{'x bare':>8}{'peak MB':>10}"
                     f"{'mem x bare':>12}")
        for m in result["config"]["methods"]:
            s = run.get(f"{m}_s")
            lay = run.get("layers_run", {}).get(m)
            layers = f"{lay}/{run['num_layers']}" if isinstance(lay, int) else "-"
            xf, xb = ratio(s, run.get("full_s")), ratio(s, run.get("bare_s"))
            mem = run["peak_mem_mb"].get(m)
            mx = run["peak_mem_over_bare_by_method"].get(m)
            lines.append(f"{m:<14}{cell(s, '.3f'):>10}{layers:>8}{cell(xf, '.2f'):>8}{cell(xb, '.2f'):>8}"
                         f"{cell(mem, '.0f'):>10}{cell(mx, '.2f'):>12}")
        lines.append("  ".join(f"{k.replace('_over_', '/')} {fmt(run[k])}" for k in
                               ("full_over_bare", "routed_over_full", "static16_over_bare", "eager_over_bare"))
                     + f"  peak mem full/bare {fmt(run['peak_mem_over_bare'])}")
        if run.get("gflops"):
            peak = (run.get("peak") or {}).get("peak_gflops")
            lines.append(f"achieved GFLOP/s ({run['flops']['total'] / 1e9:.0f} GFLOP per pass): "
                         + "  ".join(f"{m} {v:.0f}" for m, v in run["gflops"].items())
                         + (f"  peak {peak:.0f} ({run['peak']['isa']}, {run['peak']['ghz']} GHz)" if peak else ""))
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


def cell(v: Any, spec: str) -> str:
    return format(v, spec) if isinstance(v, (int, float)) else str(v or "-")


def fmt(v: Any) -> str:
    return f"{v:.2f}" if isinstance(v, (int, float)) else str(v)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model spec for load_model, or random:<shape> "
                                                  f"({', '.join(RANDOM_SHAPES)}); default: the embedded default")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    ap.add_argument("--dtype", default=None, help="float32 / bfloat16 (default: fp32 on CPU, bf16 on CUDA)")
    ap.add_argument("--methods", nargs="+", default=None, choices=MODES,
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
    args = ap.parse_args(argv)
    if args.model and args.model.startswith("random:") and args.model[7:] not in RANDOM_SHAPES:
        ap.error(f"unknown random shape {args.model[7:]!r}; known: {sorted(RANDOM_SHAPES)}")
    return args


def config(args: argparse.Namespace, device: str) -> dict[str, Any]:
    """The run's settings (recorded in the JSON's ``config``; also what an isolated child is given)."""
    threads, why = auto_threads(device) if args.threads == "auto" else (int(args.threads), "--threads")
    eager_max = (int(args.eager_max_gb * 2**30) if args.eager_max_gb is not None
                 else int(0.8 * (kb_field("/proc/meminfo", "MemAvailable") or 0)) or None)
    return {
        "model": args.model, "device": device, "dtype": args.dtype, "threads": threads, "threads_reason": why,
        "tokens_mode": args.tokens is not None, "max_doc_tokens": args.max_doc_tokens,
        "docs": args.docs or (6 if args.quick else 20), "docs_explicit": args.docs, "doc_words": args.doc_words,
        "doc_tokens": args.doc_tokens, "data_root": args.data_root,
        "repeats": args.repeats or (2 if args.quick else 5), "warmup": args.warmup,
        "eager_max_bytes": eager_max if device == "cpu" else None,
        "queries": args.queries or (3 if args.quick else 10), "candidates": args.candidates,
        "throughput_methods": args.throughput_methods, "batch_sizes": args.batch_sizes,
        "methods": [] if args.no_methods else list(args.methods or [m for m in MODES if m != "full_torch"
                                                                         or device.startswith("cuda")]),
        "isolate": args.isolate if args.isolate is not None else (device == "cpu" and not args.quick),
        "malloc": "fixed" if device == "cpu" and not args.default_malloc else "default", "router": args.router,
    }


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cfg = config(args, device)
    torch.set_num_threads(cfg["threads"])
    isolate, malloc = cfg["isolate"], cfg["malloc"]
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
    routed = mode_method("routed", lm, cfg["router"])

    sizes: list[int | None] = list(args.tokens) if args.tokens else [None]
    cases = []
    for tokens in sizes if cfg["methods"] else []:
        q, docs, source = make_case(cfg, scorer, tokens)
        cases.append((tokens, q, docs, source, prompt_tokens(scorer, q, docs)))

    def run_methods(case: tuple, run_cfg: dict[str, Any]) -> dict[str, dict[str, Any]]:
        tokens, q, docs, _, n_tok = case
        return {m: run_isolated(run_cfg, m, tokens) if isolate else
                measure(m, scorer, q, docs, run_cfg["warmup"], run_cfg["repeats"], cfg["eager_max_bytes"], n_tok,
                        cfg["router"])
                for m in cfg["methods"]}

    def record(per: dict[str, dict[str, Any]], case: tuple) -> dict[str, Any]:
        _, q, docs, source, n_tok = case
        run = summarize(per, n_tok, len(docs), source, L, H)
        # the prompts every method but eager runs: one, or one per window when the list exceeds the budget
        run["window_tokens"] = [p.length for p in scorer.window_prompts(q, docs)]
        add_flops(run, lm, run["window_tokens"], device, cfg)
        run["heads"]["routed"] = routed_source(scorer, routed, q, cfg["router"], docs)
        add_depth(run, scorer, q, docs, cfg)
        return run

    # Phase 1, times (and memory) under glibc's defaults; phase 2 (CPU), memory alone with fixed thresholds.
    pers = []
    for case in cases:
        pers.append(run_methods(case, cfg))
        result["runs"].append(record(pers[-1], case))
        write(out, result, t_start)
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
            write(out, result, t_start)

    if args.throughput:
        sf = None
        if not (args.model or "").startswith("random:") and (Path(args.data_root) / "scifact").is_dir():
            sf = SciFact(Path(args.data_root))
        result["throughput"] = throughput(cfg, lm, scorer, sf,
                                          lambda tp: write(out, {**result, "throughput": tp}, t_start))
    if len(result["runs"]) == 1:
        result = {**result["runs"][0], **result}
    write(out, result, t_start)
    if args.json:
        print(json.dumps(result, indent=1, default=str))
    else:
        print(format_table(result))
        print(f"\nwritten {out}")
    return result


def write(out: Path, result: dict[str, Any], t_start: float) -> None:
    result["machine"]["loadavg_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    result["wall_s"] = round(time.perf_counter() - t_start, 1)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".tmp")
    tmp.write_text(json.dumps(result, indent=1, default=str) + "\n")
    tmp.replace(out)


if __name__ == "__main__":
    main()
