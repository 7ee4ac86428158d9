"""The single-pass engine against separate full passes on a given device and dtype (a GPU's first check).

    python bench/engine_check.py --device cuda             # tiny Llama / Qwen2 / Gemma-3, fp32 + bf16
    python bench/engine_check.py --device cpu --dtype float32

For each tiny random architecture (the engine tests' models, incl. sliding-window ones): the calibrated scores
of the single pass (query and "N/A" in one forward, two-branch attention) and of the reference (one full pass
per suffix, the model's own SDPA masks) on the same prompt; prints the largest difference and the share of
documents ranked identically per head; the largest difference between prompts scored in one batch and one at a
time; on CUDA, how often one ``score`` call makes the host wait for the GPU. Exits 1 when a float32 difference
exceeds 1e-5. bf16 is reported, not judged: its rounding differs between kernels.
"""

from __future__ import annotations

import argparse
import json
import warnings

import torch

from routehead.engine import capture
from routehead.engine.aggregate import mask_outliers_and_sum
from routehead.engine.model import wrap_model
from routehead.engine.rows import span_logits
from routehead.engine.scorer import HeadScorer
from routehead.testing import byte_tokenizer
from routehead.testing.random_models import random_lm
from routehead.testing.tiny import tiny_model
from routehead.testing.workload import docs_for_tokens

QUERY = "which enzyme breaks down starch?"
DOCS = [f"Document {i}: amylase, lipase and protease break down starch, fats and proteins ({i})." for i in range(12)]


def check(family: str, device: str, dtype: torch.dtype) -> dict:
    model = tiny_model(family).to(device=device, dtype=dtype)
    scorer = HeadScorer(wrap_model(model, byte_tokenizer(), name=f"tiny-{family}"), max_doc_tokens=None)
    b = scorer.builder
    prompt = b.prompt(QUERY, DOCS)
    heads = [(lay, h) for lay in range(scorer.lm.num_layers) for h in range(scorer.lm.num_heads)]
    single = mask_outliers_and_sum(torch.sub(*scorer.query_rows(prompt, heads, single_pass=True)), prompt.doc_spans)
    ref = mask_outliers_and_sum(torch.sub(*scorer.query_rows(prompt, heads, single_pass=False)), prompt.doc_spans)
    same_order = (single.argsort(-1) == ref.argsort(-1)).all(-1).float().mean()
    items = [(QUERY, DOCS), ("starch?", DOCS[3:7]), (QUERY + " Which one?", DOCS[:2])]
    batched = scorer.score_many(items, batch_size=3)
    alone = [scorer.score(q, d) for q, d in items]
    batch_diff = max(float((a.calibrated - b.calibrated).abs().max()) for a, b in zip(batched, alone))
    return {**kernel_check(scorer, prompt, heads, items), "family": family,
            "dtype": str(dtype).replace("torch.", ""), "tokens": prompt.prefix_len,
            "single_pass": scorer.single_pass, "max_abs_diff": float((single - ref).abs().max()),
            "scale": float(ref.abs().max()), "heads_same_order": float(same_order),
            "batched_max_abs_diff": batch_diff, "host_syncs_per_score": host_syncs(scorer)}


def kernel_check(scorer: HeadScorer, prompt, heads: list, items: list) -> dict:
    """The fused span kernels (``auto``: used on CUDA) against the torch path: the span rows of one prompt and the
    per-token calibrated scores of prompts sharing a batch (the documents' scores before the outlier mask,
    which a change in the last float32 bit can flip at a token sitting on ``mean - 2 std``)."""
    B = len(items)
    runs = {}
    for name in ("torch", "auto"):
        with capture.kernel(name):
            rows = scorer.query_rows(prompt, heads, single_pass=True)
            toks = [s.tokens.rows for s in scorer.score_many(items, batch_size=B, keep_tokens=True)]
        runs[name] = (rows, toks)
    (qt, nt), tt = runs["torch"]
    (qf, nf), tf = runs["auto"]
    d = capture.fused(torch.empty(1, device=scorer.lm.device), 1, None)
    return {"fused": d, "fused_error": capture.FUSED_ERROR[:1],
            "kernel_rows_max_abs_diff": max(float((qt - qf).abs().max()), float((nt - nf).abs().max())),
            "kernel_rows_scale": float(qt.abs().max()),
            "kernel_tokens_max_abs_diff": max(float((a - b).abs().max()) for a, b in zip(tt, tf))}


def big_check(shape: str, tokens: int, device: str, dtype: str | None = None) -> dict:
    """A random model of a real shape (default bf16 on CUDA): fused vs torch span rows, and the ICR ranking from
    each. In bf16 two valid computations drift apart over the layers (each rounds the "N/A" rows' outputs its own
    way, and random weights amplify it); float32 shows the kernels' own error."""
    lm = random_lm(shape, device, dtype)
    scorer = HeadScorer(lm)
    query, docs = docs_for_tokens(scorer, tokens, None, 170)
    prompt = scorer.builder.prompt(query, docs)
    heads = [(lay, h) for lay in range(lm.num_layers) for h in range(lm.num_heads)]
    out = {}
    for name in ("torch", "auto"):
        with capture.kernel(name):
            q, na = scorer.query_rows(prompt, heads, single_pass=True)
        out[name] = (q, na, mask_outliers_and_sum((q - na).sum(0, keepdim=True), prompt.doc_spans)[0])
    (qt, nt, st), (qf, nf, sf) = out["torch"], out["auto"]
    dt = str(lm.dtype).replace("torch.", "")
    del lm, scorer
    torch.cuda.empty_cache() if device.startswith("cuda") else None
    return {"check": f"fused vs torch on random:{shape}", "dtype": dt,
            "tokens": prompt.length, "docs": len(docs),
            "rows_max_abs_diff": max(float((qt - qf).abs().max()), float((nt - nf).abs().max())),
            "rows_scale": float(qt.abs().max()), "icr_max_abs_diff": float((st - sf).abs().max()),
            "icr_scale": float(st.abs().max()), "icr_same_ranking": bool(torch.equal(st.argsort(), sf.argsort()))}


def host_syncs(scorer: HeadScorer) -> int | None:
    """Host waits for the GPU during one ``score`` call (CUDA's sync debug mode): a small constant (the prompt's
    copies in, the scores' copy out), not one per layer or head."""
    if scorer.lm.device.type != "cuda":
        return None
    scorer.score(QUERY, DOCS)  # warm
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            scorer.score(QUERY, DOCS)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in seen)


def tf32_check(device: str) -> dict | None:
    """The capture's float32 products of bf16 values on TF32 tensor cores against float64: as exact as float32."""
    if not device.startswith("cuda"):
        return None
    g = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(1, 8, 40, 128, device=device, generator=g).bfloat16()
    k = torch.randn(1, 8, 8192, 128, device=device, generator=g).bfloat16()
    ref = torch.matmul(q.double(), k.double().transpose(-1, -2)) * 128 ** -0.5
    fast = span_logits(q, [k], None, None).double()
    torch.backends.cuda.matmul.allow_tf32 = False
    plain = (torch.matmul(q.float(), k.float().transpose(-1, -2)) * 128 ** -0.5).double()
    scale = float(ref.abs().max())
    return {"check": "tf32 products of bf16 values", "max_abs_err_tf32": float((fast - ref).abs().max()) / scale,
            "max_abs_err_fp32": float((plain - ref).abs().max()) / scale}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--big", nargs="*", default=[], metavar="SHAPE:TOKENS[:DTYPE]",
                    help="also compare the fused kernels with the torch path on a random model of a real shape, "
                         "e.g. llama-3.1-8b:2048 or llama-3.1-8b:2048:float32 (judged in float32 only)")
    args = ap.parse_args()
    ok = True
    for name in args.dtype:
        for family in ("llama", "qwen2", "gemma3"):  # tiny Mistral's 16-token window never reaches a document
            r = check(family, args.device, getattr(torch, name))
            if name == "float32" and max(r["max_abs_diff"], r["batched_max_abs_diff"],
                                         r["kernel_rows_max_abs_diff"], r["kernel_tokens_max_abs_diff"]) > 1e-5:
                ok = False
            print(json.dumps(r), flush=True)
    tf = tf32_check(args.device)
    if tf is not None:
        print(json.dumps(tf), flush=True)
        ok &= tf["max_abs_err_tf32"] < 1e-5
    for spec in args.big:
        shape, tokens, *dt = spec.split(":")
        r = big_check(shape, int(tokens), args.device, dt[0] if dt else None)
        print(json.dumps(r), flush=True)
        if "float32" in r["dtype"]:
            ok &= r["rows_max_abs_diff"] <= 1e-5 * r["rows_scale"] and r["icr_same_ranking"]
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
