"""``routehead rerank``: one query, documents from a file, any registered method."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from routehead.assets import ROUTER_VARIANTS
from routehead.cli.inputs import highlight, read_documents
from routehead.cli.options import add_field, model_args
from routehead.selection import DEFAULT_METHOD, METHODS
from routehead.settings import DEFAULT_ORDER, LAYOUTS, ORDERS, ScoringSettings


def method_args(p: argparse.ArgumentParser) -> None:
    """``--method`` (choices from the registry), ``--router``, ``--heads``: shared by rerank and serve."""
    p.add_argument("--method", default=None, choices=list(METHODS),
                   help=f"default: route with --router, static with --heads, else {DEFAULT_METHOD}")
    p.add_argument("--router", default=None, help="router .safetensors, or a shipped variant: "
                   f"{', '.join(ROUTER_VARIANTS)} (where shipped; bce is the paper's recipe) (default: the router "
                   "shipped for the model)")
    p.add_argument("--heads", default=None, help="a head-set JSON (static, single, core) or a layer "
                   "window, JSON or s,e (layers) (default: the one shipped for the model)")
    p.add_argument("--doc-order", default=None, choices=list(ORDERS),
                   help="where the documents go in the prompt (given in first-stage order); both: debiased, 2 passes "
                        f"(default: the method's own serving order where its router records one, else {DEFAULT_ORDER})")
    p.add_argument("--layout", default=None, choices=list(LAYOUTS),
                   help="prompt layout (default: the one the heads or router were chosen under; else reference)")
    add_field(p, ScoringSettings, "max_chunks_per_doc")


def register(sub: Any) -> None:
    p = sub.add_parser("rerank", help="re-rank documents for one query")
    p.add_argument("--query", required=True)
    p.add_argument("--docs", required=True, help="JSONL with 'text' (and optional 'title'), TSV, or one doc per line")
    method_args(p)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--max-doc-tokens", type=int, default=None)
    p.add_argument("--instruction", default=None, help="the task instruction after the documents")
    p.add_argument("--evidence", type=int, default=0, help="show each document's top N words by share of its score")
    p.add_argument("--json", action="store_true", help='print {"results": [{"index","score","text"}...]}')
    model_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> None:
    from routehead.api import Reranker

    docs = read_documents(args.docs, args.layout)
    rr = Reranker(model=args.model, method=args.method, router=args.router, heads=args.heads,
                  max_doc_tokens=args.max_doc_tokens, device=args.device, dtype=args.dtype,
                  trust_remote_code=args.trust_remote_code, doc_order=args.doc_order,
                  instruction=args.instruction, layout=args.layout, max_chunks_per_doc=args.max_chunks_per_doc)
    r = rr.rerank(args.query, docs, evidence=args.evidence)
    n = len(r.indices) if args.top_k is None else args.top_k
    results = [{"index": i, "score": s, "text": docs[i]} for i, s in zip(r.indices[:n], r.scores[:n])]
    if r.evidence is not None:
        for item, ev in zip(results, r.evidence):
            item["evidence"] = ev
    if args.json:
        out: dict[str, Any] = {"results": results, "model": rr.lm.name, "method": rr.method}
        if r.heads is not None:
            out["heads"] = [list(h) for h in r.heads]
        if r.weights is not None:
            out["head_weights"] = r.weights
            out["first_stage"] = r.first_stage
        print(json.dumps(out, ensure_ascii=False))
        return
    print(f"{rr.method} on {rr.lm.name}" + (f", heads {r.heads}" if r.heads else ""))
    print(f"{'rank':>4} {'index':>5} {'score':>10}  text")
    for rank, item in enumerate(results, 1):
        text = item["text"].replace("\n", " ")
        print(f"{rank:>4} {item['index']:>5} {item['score']:>10.4f}  {text[:100]}")
        if "evidence" in item:
            print(" " * 23 + "evidence: " + ", ".join(f"{w['text']} ({w['share']:.0%})" for w in item["evidence"]))
            print(" " * 23 + highlight(item["text"], [w["text"] for w in item["evidence"]], sys.stdout.isatty()))
