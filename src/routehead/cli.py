"""Command line: ``routehead rerank | score | evaluate | detect | label | train | plot | serve``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from routehead.data import doc_text
from routehead.errors import RouteheadError
from routehead.methods import DEFAULT_METHOD, DEFAULT_ORDER, METHODS
from routehead.order import ORDERS
from routehead.prompt import DEFAULT_MAX_DOC_TOKENS, LAYOUTS, document_text


# -- inputs ----------------------------------------------------------------------------------------------------
def read_documents(path: str, layout: str | None = None) -> list[str]:
    """Documents from JSONL (``text``, optional ``title``, joined as the prompt layout joins them: ``title\\ntext``,
    ``title. text`` under v1), TSV (``id<TAB>text``: the last column) or plain lines."""
    p = Path(path)
    if not p.is_file():
        raise RouteheadError(f"documents file not found: {path}")
    lines = [ln for ln in p.read_text(encoding="utf-8").splitlines() if ln.strip()]
    docs = []
    for i, line in enumerate(lines, 1):
        if p.suffix == ".jsonl" or line.lstrip().startswith("{"):
            try:
                obj = json.loads(line)
                text = obj["text"]
            except (ValueError, KeyError, TypeError) as exc:
                raise RouteheadError(f"{path}:{i}: expected a JSON object with a 'text' field ({exc})") from None
            title = obj.get("title")
            docs.append(doc_text({"title": title, "text": str(text)}) if layout == "v1"
                        else document_text(str(text), title))
        elif p.suffix == ".tsv":
            docs.append(line.split("\t")[-1])
        else:
            docs.append(line)
    if not docs:
        raise RouteheadError(f"{path} holds no documents")
    return docs


def _model_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--model", default=None, help="hub id, local folder, .gguf file, or an embedded name "
                    "(smollm2-135m [default], gemma3-270m)")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    ap.add_argument("--dtype", default=None, help="float32 (CPU default) | bfloat16 (CUDA default) | float16")
    ap.add_argument("--trust-remote-code", action="store_true", help="allow model code from the hub (off by default)")


def _data_args(ap: argparse.ArgumentParser, split: str) -> None:
    ap.add_argument("--data", required=True, help="a BEIR-layout folder (corpus.jsonl, queries.jsonl, qrels/)")
    ap.add_argument("--split", default=split)
    ap.add_argument("--top-k", type=int, default=20, help="candidates re-ranked per query (default 20)")
    ap.add_argument("--max-queries", type=int, default=None, help="only the first N queries (quick runs)")
    ap.add_argument("--max-doc-tokens", type=int, default=DEFAULT_MAX_DOC_TOKENS,
                    help=f"per-document truncation (default {DEFAULT_MAX_DOC_TOKENS})")
    ap.add_argument("--doc-order", default="reverse", choices=["reverse", "input", "shuffle"],
                    help="candidates' order in the prompt: reverse (best last, the published runs; default), "
                         "input (first-stage order) or shuffle (a fixed random order per query)")
    ap.add_argument("--retrieval-type", default="IE", choices=["IE", "QA"], help="ICR's late instruction")
    ap.add_argument("--layout", default="reference", choices=sorted(LAYOUTS), help="prompt layout: reference "
                    "(the ICR/QRHead code's; default) or v1 (segments tokenized alone, query-only span)")
    ap.add_argument("--batch-size", type=int, default=1, help="prompts per forward pass when computing S "
                    "(same scores; more queries/s on a GPU with a small model; default 1)")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--stored-only", action="store_true", help="use only the queries already in the store "
                    "(no forward passes; the rest are left out)")


def _scored(args: argparse.Namespace, compute: bool = True) -> tuple[Any, Any]:
    from routehead.collect import score_collection
    from routehead.data import load_collection
    from routehead.model import load_model
    from routehead.scorer import HeadScorer

    coll = load_collection(args.data, args.split)
    lm = load_model(args.model, device=args.device, dtype=args.dtype, trust_remote_code=args.trust_remote_code)
    scorer = HeadScorer(lm, max_doc_tokens=args.max_doc_tokens, retrieval_type=args.retrieval_type,
                        layout=args.layout)
    shard, num = getattr(args, "shard", (0, 1))
    compute = compute and not getattr(args, "stored_only", False)
    sc = score_collection(coll, scorer if compute else None, scorer.settings(), top_k=args.top_k,
                          max_queries=args.max_queries, shard=shard, num_shards=num, progress=not args.no_progress,
                          batch_size=args.batch_size, doc_order=args.doc_order)
    if not compute:  # evaluate the stored queries only, not the rest in first-stage order
        sc.first_stage = {q: c for q, c in sc.first_stage.items() if q in sc.entries}
    return sc, scorer


# -- commands --------------------------------------------------------------------------------------------------
def cmd_rerank(args: argparse.Namespace) -> None:
    from routehead.api import Reranker

    docs = read_documents(args.docs, args.layout)
    rr = Reranker(model=args.model, method=args.method, router=args.router, heads=args.heads,
                  max_doc_tokens=args.max_doc_tokens, device=args.device, dtype=args.dtype,
                  trust_remote_code=args.trust_remote_code, doc_order=args.doc_order,
                  instruction=args.instruction, layout=args.layout)
    r = rr.rerank(args.query, docs, evidence=args.evidence)
    n = len(r.indices) if args.top_k is None else args.top_k
    results = [{"index": i, "score": s, "text": docs[i]} for i, s in zip(r.indices[:n], r.scores[:n])]
    if r.evidence is not None:
        for item, ev in zip(results, r.evidence):
            item["evidence"] = ev
    if args.json:
        out: dict[str, Any] = {"results": results, "model": rr.lm.name, "method": rr.method}
        if r.heads is not None and rr.method != "icr":
            out["heads"] = [list(h) for h in r.heads]
        if r.weights is not None:
            out["head_weights"] = r.weights
            out["first_stage"] = r.first_stage
        print(json.dumps(out, ensure_ascii=False))
        return
    print(f"{rr.method} on {rr.lm.name}" + (f", heads {r.heads}" if r.heads and rr.method != "icr" else ""))
    print(f"{'rank':>4} {'index':>5} {'score':>10}  text")
    for rank, item in enumerate(results, 1):
        text = item["text"].replace("\n", " ")
        print(f"{rank:>4} {item['index']:>5} {item['score']:>10.4f}  {text[:100]}")
        if "evidence" in item:
            print(" " * 23 + "evidence: " + ", ".join(f"{w['text']} ({w['share']:.0%})" for w in item["evidence"]))
            print(" " * 23 + highlight(item["text"], [w["text"] for w in item["evidence"]], sys.stdout.isatty()))


def highlight(text: str, words: list[str], tty: bool, width: int = 300) -> str:
    """An excerpt of ``text`` around its first evidence word, every evidence word marked (ANSI bold yellow on a
    terminal, ``**word**`` otherwise): where in the document the attention went, at a glance."""
    import re

    words = [w for w in words if w]
    if not words:
        return text.replace("\n", " ")[:width]
    pattern = re.compile("|".join(re.escape(w) for w in sorted(words, key=len, reverse=True)))
    flat = text.replace("\n", " ")
    first = pattern.search(flat)
    start = max(0, (first.start() if first else 0) - width // 5)
    piece = flat[start:start + width]
    on, off = ("\033[1;33m", "\033[0m") if tty else ("**", "**")
    marked = pattern.sub(lambda m: f"{on}{m.group(0)}{off}", piece)
    return ("..." if start else "") + marked + ("..." if start + width < len(flat) else "")


def cmd_score(args: argparse.Namespace) -> None:
    if args.ray is not None:  # the same store, filled by Ray actors (routehead.ray)
        from routehead.ray import score_command

        return score_command(args)
    import signal

    # a stopped run keeps its finished queries: SIGTERM (and SIGINT, which background jobs may ignore) unwind
    # through the store, which flushes what is buffered
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, _frame: sys.exit(128 + signum))
    sc, _ = _scored(args)
    print(f"{len(sc.entries)} queries stored for {sc.collection.name}/{sc.collection.split}")


def cmd_detect(args: argparse.Namespace) -> None:
    from routehead.evaluate import detect_heads
    from routehead.heads import save_heads

    sc, scorer = _scored(args)
    heads, q = detect_heads(sc, args.top)
    save_heads(args.out, heads, scorer.lm.identity(), prompt=scorer.builder.settings(),
               doc_order=sc.settings["doc_order"],
               detected_on=f"{sc.collection.name}/{sc.collection.split}", n_queries=len(sc.entries),
               quality=[round(float(q[a, b]), 4) for a, b in heads])
    print(f"top {args.top} heads by nDCG@10 alone on {len(sc.entries)} queries -> {args.out}")
    for a, b in heads:
        print(f"  layer {a:2d} head {b:2d}  nDCG@10 {q[a, b]:.4f}")


def cmd_label(args: argparse.Namespace) -> None:
    from routehead.evaluate import detect_heads, queries_for
    from routehead.labels import label_queries, prior_quality, save_labels

    sc, scorer = _scored(args)
    pool, _ = detect_heads(sc, args.pool_size)
    qs = queries_for(sc, pool, args.use_first_stage)
    prior = prior_quality(qs)
    labels = label_queries(qs, prior, max_heads=args.label_max_heads)
    save_labels(args.out, labels, pool,
                {**sc.settings, "identity": scorer.lm.identity(), "pool_size": args.pool_size, "search": "greedy",
                 "tie_break": "prior (mean nDCG@10 alone over these queries)", "max_heads": args.label_max_heads,
                 "use_first_stage": args.use_first_stage, "queries": len(qs)})
    sizes = [len(c) for c, _ in labels.values()]
    print(f"{len(labels)} of {len(qs)} queries labelled (the rest have no relevant candidate in reach), "
          f"{sum(sizes) / max(len(sizes), 1):.2f} heads a label, mean label nDCG@10 "
          f"{sum(v for _, v in labels.values()) / max(len(labels), 1):.4f} -> {args.out}")


def cmd_train(args: argparse.Namespace) -> None:
    from routehead.train import TrainSettings, fit_router

    sc, scorer = _scored(args)
    settings = TrainSettings(objective=args.objective, sparsity=args.sparsity, lr=args.lr, seed=args.seed,
                             bce_weight=args.bce_weight, depth_cost=args.depth_cost)
    router, _ = fit_router(sc, scorer, embed_layer=args.embed_layer, pooling=args.pooling,
                              use_first_stage=args.use_first_stage, max_heads=args.label_max_heads,
                              labels_kind=args.labels, pool_size=args.pool_size, folds=args.folds,
                              settings=settings, max_layer=args.max_layer)
    router.save(args.out)
    t = router.config.training
    held_out = f"out-of-fold ({args.folds} folds)" if args.folds > 1 else "dev"
    layers = t.get("layers_run_train", t.get("dev_layers_run"))
    print(f"router -> {args.out}: {held_out} nDCG@10 {t['dev_ndcg@10']:.4f}, routed passes run {layers:.0%} of the "
          f"layers, threshold {router.config.threshold}, {t['train_queries']} training queries")


def cmd_evaluate(args: argparse.Namespace) -> None:
    from routehead.api import default_heads_path, router_path
    from routehead.evaluate import dense_scores, format_table, make_run, query_embeddings, report, save_json
    from routehead.heads import load_heads
    from routehead.router import load_router

    sc, scorer = _scored(args)
    identity = scorer.lm.identity()
    runs, extra = {}, {}
    pool = None
    for name in args.reranker:
        if name in ("static", "single"):
            path = args.heads or default_heads_path(scorer.lm.name)
            heads, body = load_heads(path, identity)
            if name == "single":
                heads = heads[:1]
            runs[name] = make_run(sc, name, heads=heads)
        elif name == "route":
            router = load_router(router_path(scorer.lm.name, args.router)[0], identity)
            emb = query_embeddings(sc, scorer, router.config.embed_layer, router.config.pooling)
            sizes: list[int] = []
            runs[name] = make_run(sc, "route", router=router, embeddings=emb, routed_sizes=sizes)
            pool = router.config.pool_heads
            extra["route_mean_heads"] = sum(sizes) / max(len(sizes), 1)
        elif name == "dense":
            runs[name] = make_run(sc, "dense", dense_scores=dense_scores(sc))
        elif name == "oracle":
            from routehead.evaluate import detect_heads

            runs[name] = make_run(sc, "oracle", pool=pool or detect_heads(sc, 64)[0])
        else:
            runs[name] = make_run(sc, name)
    rep = report(sc, runs, baselines=[b for b in ("bm25", "icr", "static") if b in runs])
    rep.update(extra)
    if args.out:
        save_json(rep, args.out)
    if args.json:
        single = len(args.reranker) == 1
        if single:
            name = args.reranker[0]
            print(json.dumps({"dataset": rep["dataset"], "split": rep["split"], "reranker": name,
                              "n_queries": rep["n_queries"], "metrics": rep["rerankers"][name]["metrics"], **extra}))
        else:
            print(json.dumps(rep))
    else:
        print(format_table(rep))


def cmd_plot(args: argparse.Namespace) -> None:
    from routehead.api import router_path
    from routehead.plots import head_maps

    sc, scorer = _scored(args)
    paths = head_maps(sc, scorer, args.out,
                      router_path=None if args.router is None else router_path(scorer.lm.name, args.router)[0])
    for p in paths:
        print(p)


def cmd_serve(args: argparse.Namespace) -> None:
    from routehead.api import Reranker
    from routehead.service import Limits, ServiceSettings, serve
    from routehead.service.config import batching_for

    devices = [d.strip() for d in args.devices.split(",") if d.strip()] if args.devices else [args.device]

    def factory() -> list[Reranker]:
        """One replica per device, all behind the same queue (loaded after the socket opens: /ready is 503)."""
        return [Reranker(model=args.model, method=args.method, router=args.router, heads=args.heads,
                         device=device, dtype=args.dtype, trust_remote_code=args.trust_remote_code,
                         doc_order=args.doc_order, layout=args.layout)
                for device in devices]

    settings = ServiceSettings(max_batch_tokens=args.max_batch_tokens, max_batch_requests=args.max_batch_requests,
                               max_concurrent_requests=args.max_concurrent_requests,
                               request_timeout_s=args.request_timeout, graceful_shutdown_s=args.graceful_shutdown,
                               max_connections=args.max_connections,
                               batching=batching_for(args.batching if not args.no_batching else "off", devices))
    serve(factory, host=args.host, port=args.port, settings=settings, json_logs=args.json_logs,
          replica_names=[d or "default" for d in devices],
          limits=Limits(max_documents=args.max_documents, max_document_chars=args.max_document_chars,
                        max_request_tokens=args.max_request_tokens))


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="routehead", description="Attention-based re-ranking with LLMs: ICR, static "
                                 "heads (QRHead) and per-query head routing (RouteHead).")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("rerank", help="re-rank documents for one query")
    p.add_argument("--query", required=True)
    p.add_argument("--docs", required=True, help="JSONL with 'text' (and optional 'title'), TSV, or one doc per line")
    p.add_argument("--method", default=None, choices=list(METHODS),
                   help=f"default: route with --router, static with --heads, else {DEFAULT_METHOD}")
    p.add_argument("--router", default=None, help="router .safetensors, or a shipped variant: bce (the paper's), fs, "
                   "fast (where shipped) (default: the router shipped for the model)")
    p.add_argument("--heads", default=None, help="head-set JSON for --method static (default: the shipped one)")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--max-doc-tokens", type=int, default=None)
    p.add_argument("--doc-order", default=DEFAULT_ORDER, choices=list(ORDERS),
                   help="where the documents go in the prompt (given in first-stage order); both: debiased, 2 passes "
                        f"(default {DEFAULT_ORDER})")
    p.add_argument("--instruction", default=None, help="the task instruction after the documents")
    p.add_argument("--layout", default=None, choices=sorted(LAYOUTS),
                   help="prompt layout (default: the one the heads or router were chosen under; else reference)")
    p.add_argument("--evidence", type=int, default=0, help="show each document's top N words by share of its score")
    p.add_argument("--json", action="store_true", help='print {"results": [{"index","score","text"}...]}')
    _model_args(p)
    p.set_defaults(func=cmd_rerank)

    p = sub.add_parser("score", help="compute and store S[layer, head, doc] for a collection (resumable)")
    _data_args(p, "test")
    _model_args(p)
    p.add_argument("--shard", type=lambda s: tuple(int(x) for x in s.split("/")), default=(0, 1),
                   help="i/n: score only every n-th query starting at i (split work across processes)")
    p.add_argument("--ray", type=int, nargs="?", const=0, default=None, metavar="N",
                   help="score with N Ray actors, one model each (bare: one per GPU, else 1); needs routehead[ray]")
    p.add_argument("--address", default=None, help="Ray cluster address for --ray (default: start a local Ray)")
    p.set_defaults(func=cmd_score)

    p = sub.add_parser("evaluate", help="metrics of re-rankers on a BEIR folder")
    _data_args(p, "test")
    _model_args(p)
    p.add_argument("--reranker", nargs="+", default=["route"],
                   choices=["bm25", "position", "dense", "icr", "static", "single", "route", "oracle"])
    p.add_argument("--heads", default=None, help="head-set JSON for static/single (default: shipped)")
    p.add_argument("--router", default=None, help="router for route: a .safetensors or a shipped variant (bce, fs, "
                   "fast; default: the shipped router)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--out", default=None, help="also write the full report as JSON")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("detect", help="QRHead-style static heads: the top heads by nDCG@10 on a detection split")
    _data_args(p, "train")
    _model_args(p)
    p.add_argument("--top", type=int, default=16)
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_detect)

    p = sub.add_parser("label", help="pseudo labels by greedy head-set search on a judged split (JSON)")
    _data_args(p, "train")
    _model_args(p)
    p.add_argument("--out", required=True, help="labels .json")
    p.add_argument("--pool-size", type=int, default=64, help="search over the N best heads alone on this split")
    p.add_argument("--use-first-stage", action="store_true", help="the first-stage score is one more signal")
    p.add_argument("--label-max-heads", type=int, default=4, help="size cap of a label")
    p.set_defaults(func=cmd_label)

    p = sub.add_parser("train", help="pseudo labels + router training on a train split (dev carved from it)")
    _data_args(p, "train")
    _model_args(p)
    p.add_argument("--out", required=True, help="router .safetensors")
    p.add_argument("--objective", default="listwise", choices=["listwise", "bce"],
                   help="listwise: through the ranking, probability-weighted heads (default); bce: the paper's "
                        "BCE on greedy pseudo labels, heads summed")
    p.add_argument("--embed-layer", type=int, default=8)
    p.add_argument("--pooling", default="mean", choices=["mean", "last"])
    p.add_argument("--use-first-stage", action="store_true", help="let the router also route the first-stage score")
    p.add_argument("--pool-size", type=int, default=64, help="only the N best heads on train can be routed")
    p.add_argument("--max-layer", type=int, default=None,
                   help="a depth budget: route only heads of layers <= L, so every routed pass stops there")
    p.add_argument("--folds", type=int, default=5, help="K cross-fitted routers merged into one (1: one dev split)")
    p.add_argument("--labels", default="greedy", choices=["greedy", "soft"],
                   help="greedy: binary greedy head sets (paper); soft: each head's own nDCG@10 as the target")
    p.add_argument("--label-max-heads", type=int, default=4)
    p.add_argument("--sparsity", type=float, default=0.0, help="weight of the mean routing probability")
    p.add_argument("--depth-cost", type=float, default=0.0,
                   help="weight of the expected fraction of layers a routed pass runs (cost-aware routing: "
                        "shallower routes where the ranking loses little)")
    p.add_argument("--bce-weight", type=float, default=0.0, help="listwise: auxiliary pseudo-label BCE weight")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("plot", help="head maps (PNG): per-head nDCG@10 and router picks")
    _data_args(p, "test")
    _model_args(p)
    p.add_argument("--router", default=None)
    p.add_argument("--out", default="results/plots")
    p.set_defaults(func=cmd_plot)

    p = sub.add_parser("serve", help="HTTP re-rank service (Cohere /v1|v2/rerank, TEI /rerank, /health, /ready, "
                       "/metrics)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--method", default=None, choices=list(METHODS),
                   help=f"default: route with --router, static with --heads, else {DEFAULT_METHOD}")
    p.add_argument("--router", default=None)
    p.add_argument("--heads", default=None)
    p.add_argument("--doc-order", default=DEFAULT_ORDER, choices=list(ORDERS),
                   help=f"where the documents go in the prompt (default {DEFAULT_ORDER})")
    p.add_argument("--layout", default=None, choices=sorted(LAYOUTS),
                   help="prompt layout (default: the one the heads or router were chosen under; else reference)")
    p.add_argument("--max-documents", type=int, default=1000)
    p.add_argument("--max-document-chars", type=int, default=20000)
    p.add_argument("--max-request-tokens", type=int, default=65536, help="estimated prompt tokens a request may "
                   "cost (422 past it)")
    p.add_argument("--devices", default=None, help="comma-separated devices, one model replica each behind one "
                   "queue: cuda:0,cuda:1 or cpu (default: --device)")
    p.add_argument("--max-batch-tokens", type=int, default=16384, help="padded prompt tokens per model call")
    p.add_argument("--max-batch-requests", type=int, default=32, help="requests per model call")
    p.add_argument("--batching", default="auto", choices=["auto", "on", "off"], help="share model calls between "
                   "queued requests: auto (default) = on for GPUs, off on CPU, where it measured slower")
    p.add_argument("--no-batching", action="store_true", help="the same as --batching off")
    p.add_argument("--max-concurrent-requests", type=int, default=512, help="queued + running; 429 past it")
    p.add_argument("--max-connections", type=int, default=1024, help="open connections; 503 past it")
    p.add_argument("--request-timeout", type=float, default=120.0, help="seconds before a request gets 504")
    p.add_argument("--graceful-shutdown", type=float, default=30.0, help="seconds SIGTERM waits for in-flight work")
    p.add_argument("--json-logs", action="store_true", help="log JSON lines (one per request, with timings)")
    _model_args(p)
    p.set_defaults(func=cmd_serve)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except RouteheadError as exc:
        print(f"routehead: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
