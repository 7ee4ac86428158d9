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
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from routehead.model import wrap_model  # noqa: E402
from routehead.scorer import HeadScorer, mask_outliers_and_sum  # noqa: E402
from routehead.testing import byte_tokenizer  # noqa: E402
from tests.tiny import tiny_model  # noqa: E402

QUERY = "which enzyme breaks down starch?"
DOCS = [f"Document {i}: amylase, lipase and protease break down starch, fats and proteins ({i})." for i in range(12)]


def check(family: str, device: str, dtype: torch.dtype) -> dict:
    model = tiny_model(family).to(device=device, dtype=dtype)
    scorer = HeadScorer(wrap_model(model, byte_tokenizer(), name=f"tiny-{family}"), max_doc_tokens=None)
    b = scorer.builder
    prompt = b.build(b.encode_query(QUERY), b.encode_documents(DOCS)[0])
    heads = [(lay, h) for lay in range(scorer.lm.num_layers) for h in range(scorer.lm.num_heads)]
    single = mask_outliers_and_sum(torch.sub(*scorer.query_rows(prompt, heads, single_pass=True)), prompt.doc_spans)
    ref = mask_outliers_and_sum(torch.sub(*scorer.query_rows(prompt, heads, single_pass=False)), prompt.doc_spans)
    same_order = (single.argsort(-1) == ref.argsort(-1)).all(-1).float().mean()
    items = [(QUERY, DOCS), ("starch?", DOCS[3:7]), (QUERY + " Which one?", DOCS[:2])]
    batched = scorer.score_many(items, batch_size=3)
    alone = [scorer.score(q, d) for q, d in items]
    batch_diff = max(float((a.calibrated - b.calibrated).abs().max()) for a, b in zip(batched, alone))
    return {"family": family, "dtype": str(dtype).replace("torch.", ""), "tokens": prompt.prefix_len,
            "single_pass": scorer.single_pass, "max_abs_diff": float((single - ref).abs().max()),
            "scale": float(ref.abs().max()), "heads_same_order": float(same_order),
            "batched_max_abs_diff": batch_diff, "host_syncs_per_score": host_syncs(scorer)}


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
    from routehead.capture import _logits

    g = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(1, 8, 40, 128, device=device, generator=g).bfloat16()
    k = torch.randn(1, 8, 8192, 128, device=device, generator=g).bfloat16()
    ref = torch.matmul(q.double(), k.double().transpose(-1, -2)) * 128 ** -0.5
    fast = _logits(q, [k], None, None).double()
    torch.backends.cuda.matmul.allow_tf32 = False
    plain = (torch.matmul(q.float(), k.float().transpose(-1, -2)) * 128 ** -0.5).double()
    scale = float(ref.abs().max())
    return {"check": "tf32 products of bf16 values", "max_abs_err_tf32": float((fast - ref).abs().max()) / scale,
            "max_abs_err_fp32": float((plain - ref).abs().max()) / scale}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"])
    args = ap.parse_args()
    ok = True
    for name in args.dtype:
        for family in ("llama", "qwen2", "gemma3"):  # tiny Mistral's 16-token window never reaches a document
            r = check(family, args.device, getattr(torch, name))
            if name == "float32" and max(r["max_abs_diff"], r["batched_max_abs_diff"]) > 1e-5:
                ok = False
            print(json.dumps(r), flush=True)
    tf = tf32_check(args.device)
    if tf is not None:
        print(json.dumps(tf), flush=True)
        ok &= tf["max_abs_err_tf32"] < 1e-5
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
