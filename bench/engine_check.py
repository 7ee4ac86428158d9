"""The single-pass engine against separate full passes on a given device and dtype (a GPU's first check).

    python bench/engine_check.py --device cuda             # tiny Llama / Qwen2 / Gemma-3, fp32 + bf16
    python bench/engine_check.py --device cpu --dtype float32

For each tiny random architecture (the engine tests' models, incl. sliding-window ones): the calibrated scores
of the single pass (query and "N/A" in one forward, two-branch attention) and of the reference (one full pass
per suffix, the model's own SDPA masks) on the same prompt; prints the largest difference and the share of
documents ranked identically per head, and exits 1 when a float32 difference exceeds 1e-5. bf16 is reported,
not judged: its rounding differs between kernels.
"""

from __future__ import annotations

import argparse
import json
import sys
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
    return {"family": family, "dtype": str(dtype).replace("torch.", ""), "tokens": prompt.prefix_len,
            "single_pass": scorer.single_pass, "max_abs_diff": float((single - ref).abs().max()),
            "scale": float(ref.abs().max()), "heads_same_order": float(same_order)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"])
    args = ap.parse_args()
    ok = True
    for name in args.dtype:
        for family in ("llama", "qwen2", "gemma3"):  # tiny Mistral's 16-token window never reaches a document
            r = check(family, args.device, getattr(torch, name))
            if name == "float32" and r["max_abs_diff"] > 1e-5:
                ok = False
            print(json.dumps(r), flush=True)
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
