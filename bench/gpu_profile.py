"""Where the full tensor's time above the bare pass goes, on a GPU: kernel totals of one bare pass and one
``score`` (all heads) at the same prompt, by kernel name, and each call's wall time.

    python bench/gpu_profile.py --model random:llama-3.1-8b --tokens 8192 [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from routehead.engine.scorer import HeadScorer
from routehead.selection import load_method
from routehead.testing.passes import rerank_pass
from routehead.testing.random_models import build_lm
from routehead.testing.workload import docs_for_tokens


def kernels(fn) -> tuple[float, dict[str, float]]:
    fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    wall = time.perf_counter() - t
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    by = {e.key: e.self_device_time_total / 1e3 for e in prof.key_averages()
          if e.device_type == DeviceType.CUDA and not e.is_user_annotation}
    return wall, by


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="random:llama-3.1-8b")
    ap.add_argument("--tokens", type=int, nargs="+", default=[8192])
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    lm = build_lm(args.model, "cuda", None)
    scorer = HeadScorer(lm, max_doc_tokens=None)
    icr = load_method("icr", lm.identity())  # every head, as Reranker(method="icr") runs it
    out = {}
    for T in args.tokens:
        q, docs = docs_for_tokens(scorer, T, None, 170)
        res = {m: kernels(f) for m, f in (("bare", lambda q=q, docs=docs: scorer.bare_forward(q, docs)),
                                          ("full", lambda q=q, docs=docs: rerank_pass(scorer, [(q, docs)], icr)))}
        names = sorted(set(res["bare"][1]) | set(res["full"][1]), key=lambda k: -res["full"][1].get(k, 0))
        rows = [(k, res["bare"][1].get(k, 0.0), res["full"][1].get(k, 0.0)) for k in names]
        tot = {m: sum(v for v in res[m][1].values()) for m in res}
        print(f"== {T} tokens: wall bare {res['bare'][0] * 1e3:.1f} ms, full {res['full'][0] * 1e3:.1f} ms; "
              f"kernels bare {tot['bare']:.1f} ms, full {tot['full']:.1f} ms")
        for k, b, f in sorted(rows, key=lambda r: -(r[2] - r[1]))[:14]:
            print(f"  {f - b:+8.2f} ms  (bare {b:7.2f}, full {f:7.2f})  {k[:110]}")
        out[T] = {"wall_ms": {m: res[m][0] * 1e3 for m in res}, "kernel_ms": tot, "by_kernel": rows}
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
