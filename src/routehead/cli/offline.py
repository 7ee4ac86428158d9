"""``routehead score | detect | label | train``: offline passes over a collection, and what is learnt from them."""

from __future__ import annotations

import argparse
import sys
from dataclasses import fields
from typing import Any

from routehead.cli.options import add_field, data_args, job_from, jobs_from, print_warnings
from routehead.settings import FitSettings


def score(args: argparse.Namespace) -> None:
    job = job_from(args)
    if args.ray is not None:  # the same store, filled by Ray actors (routehead.integrations.ray)
        from routehead.integrations.ray import score_command

        return score_command(job, args.ray, args.address)
    import signal

    # a stopped run keeps its finished queries: SIGTERM (and SIGINT, which background jobs may ignore) unwind
    # through the store, which flushes what is buffered
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, _frame: sys.exit(128 + signum))
    sc, _ = job.run()
    print_warnings(sc.collection)
    print(f"{len(sc.entries)} queries stored for {sc.collection.name}/{sc.collection.split}")


def detect(args: argparse.Namespace) -> None:
    """The asset of a detection rule: QRHead's heads, CoRe's heads or Selective-ICR's layer window."""
    from routehead.errors import RouteheadError

    given = [o for o, v in (("--temperature", args.temperature), ("--prune", args.prune), ("--width", args.width),
                            ("--max-layer", args.max_layer)) if v is not None]
    allowed = {"qrhead": {"--max-layer"}, "core": {"--temperature", "--prune", "--max-layer"}, "layers": {"--width"}}
    if set(given) - allowed[args.rule]:
        raise RouteheadError(f"{', '.join(sorted(set(given) - allowed[args.rule]))} not used by --rule {args.rule}")
    sc, scorer = job_from(args).run()
    print_warnings(sc.collection)
    source = {"prompt": scorer.builder.settings(), "doc_order": sc.settings["doc_order"],
              "detected_on": f"{sc.collection.name}/{sc.collection.split}", "n_queries": len(sc.entries)}
    {"qrhead": _detect_qrhead, "core": _detect_core, "layers": _detect_window}[args.rule](args, sc, scorer, source)


def _detect_qrhead(args: argparse.Namespace, sc: Any, scorer: Any, source: dict[str, Any]) -> None:
    from routehead.selection.heads import save_heads
    from routehead.training.detect import detect_heads

    top = args.top or 16
    heads, q = detect_heads(sc, top, max_layer=args.max_layer)
    save_heads(args.out, heads, scorer.lm.identity(), **source, quality=[round(float(q[a, b]), 4) for a, b in heads])
    print(f"top {top} heads by nDCG@10 alone on {len(sc.entries)} queries -> {args.out}")
    for a, b in heads:
        print(f"  layer {a:2d} head {b:2d}  nDCG@10 {q[a, b]:.4f}")


def _detect_core(args: argparse.Namespace, sc: Any, scorer: Any, source: dict[str, Any]) -> None:
    from routehead.selection.heads import save_heads
    from routehead.training.detect import CORE_TEMPERATURE, CORE_TOP, detect_core, layer_limit

    top = args.top or CORE_TOP
    t = CORE_TEMPERATURE if args.temperature is None else args.temperature
    prune = args.prune or 0.0
    if sc.settings["doc_order"] != "shuffle":
        print(f"note: the store's prompt order is {sc.settings['doc_order']!r}; CoRe's positives should vary in "
              f"position (--doc-order shuffle)", file=sys.stderr)
    heads, S, n = detect_core(sc, top, t, prune, args.max_layer)
    keep = layer_limit(S.shape[0], prune, args.max_layer)
    detection = {"rule": "core", "temperature": t, "prune": prune, "max_layer": args.max_layer, "layers_kept": keep,
                 "samples": n, "negatives": "the store's candidates not judged relevant"}
    save_heads(args.out, heads, scorer.lm.identity(), **source, detection=detection,
               core_score=[round(float(S[a, b]), 6) for a, b in heads])
    print(f"top {top} CoRe heads (t={t}, layers 0..{keep - 1}) on {n} samples of {len(sc.entries)} queries "
          f"-> {args.out}")
    for a, b in heads:
        print(f"  layer {a:2d} head {b:2d}  CoRe score {S[a, b]:.4f}")


def _detect_window(args: argparse.Namespace, sc: Any, scorer: Any, source: dict[str, Any]) -> None:
    from routehead.selection.layers import save_window
    from routehead.training.detect import detect_window

    (s, e), per_layer, per_window = detect_window(sc, args.width)
    detection = {"rule": "layers", "width": e - s + 1, "ndcg@10": round(float(per_window[s]), 4)}
    save_window(args.out, (s, e), scorer.lm.identity(), **source, detection=detection,
                layer_ndcg=[round(float(x), 4) for x in per_layer],
                window_ndcg=[round(float(x), 4) for x in per_window])
    print(f"layers {s}..{e} (width {e - s + 1}): nDCG@10 {per_window[s]:.4f} on {len(sc.entries)} queries "
          f"-> {args.out}")
    for lay, x in enumerate(per_layer):
        print(f"  layer {lay:2d}  nDCG@10 {x:.4f}" + ("  *" if s <= lay <= e else ""))


def label(args: argparse.Namespace) -> None:
    from routehead.offline.views import queries_for
    from routehead.training.detect import detect_heads
    from routehead.training.labels import label_queries, prior_quality, save_labels

    sc, scorer = job_from(args).run()
    print_warnings(sc.collection)
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


def train(args: argparse.Namespace) -> None:
    """A router from one collection split's stored passes, or from several together (``--data A:train B:test``:
    one view over their stores, :func:`routehead.offline.collect.merge_scored`; the model loads once)."""
    from routehead.offline.collect import merge_scored
    from routehead.training.fit import fit_router

    scs, scorer = [], None
    for job in jobs_from(args):
        sc, scorer = job.run(scorer=scorer)
        print_warnings(sc.collection)
        scs.append(sc)
    sc = scs[0] if len(scs) == 1 else merge_scored(scs)
    settings = FitSettings(**{f.name: getattr(args, f.name) for f in fields(FitSettings)})
    router, _ = fit_router(sc, scorer, settings)
    router.save(args.out)
    t = router.config.training
    held_out = f"out-of-fold ({settings.folds} folds)" if settings.folds > 1 else "dev"
    layers = t.get("layers_run_train", t.get("dev_layers_run"))
    print(f"router -> {args.out}: {held_out} nDCG@10 {t['dev_ndcg@10']:.4f}, routed passes run {layers:.0%} of the "
          f"layers, threshold {router.config.threshold}, {t['train_queries']} training queries"
          + (f" of {', '.join(router.config.trained_on)}" if len(scs) > 1 else ""))


def register(sub: Any) -> None:
    p = sub.add_parser("score", help="compute and store S[layer, head, doc] for a collection (resumable)")
    data_args(p, "test")
    p.add_argument("--shard", type=lambda s: tuple(int(x) for x in s.split("/")), default=(0, 1),
                   help="i/n: score only every n-th query starting at i (split work across processes)")
    p.add_argument("--ray", type=int, nargs="?", const=0, default=None, metavar="N",
                   help="score with N Ray actors, one model each (bare: one per GPU, else 1); needs routehead[ray]")
    p.add_argument("--address", default=None, help="Ray cluster address for --ray (default: start a local Ray)")
    p.set_defaults(func=score)

    p = sub.add_parser("detect", help="a method's asset from a detection split: QRHead's or CoRe's heads (JSON), or "
                       "Selective-ICR's layer window (JSON)")
    data_args(p, "train")
    p.add_argument("--rule", default="qrhead", choices=["qrhead", "core", "layers"],
                   help="qrhead: the top heads by nDCG@10 alone (static); core: the top heads by CoRe's contrastive "
                   "score on the raw attention mass (core; score with --doc-order shuffle); layers: the window of "
                   "--width layers with the best nDCG@10 (layers) (default qrhead)")
    p.add_argument("--top", type=int, default=None, help="heads kept (default 16 for qrhead, 8 for core)")
    p.add_argument("--temperature", type=float, default=None, help="core: the contrast's temperature (default "
                   "0.1, the authors' for Llama-family models; they use 0.001 for Mistral and Granite)")
    p.add_argument("--prune", type=float, default=None, help="core: leave out the final fraction P of the layers "
                   "(choose among layers < floor(L (1 - P)); default 0)")
    p.add_argument("--max-layer", type=int, default=None, help="qrhead, core: choose only among layers <= M")
    p.add_argument("--width", type=int, default=None, help="layers: the window's width in layers (default: 4/28 "
                   "of the depth, the authors' Qwen3-0.6B window [10, 13])")
    p.add_argument("--out", required=True)
    p.set_defaults(func=detect)

    p = sub.add_parser("label", help="pseudo labels by greedy head-set search on a judged split (JSON)")
    data_args(p, "train")
    p.add_argument("--out", required=True, help="labels .json")
    for name in ("pool_size", "use_first_stage", "label_max_heads"):
        add_field(p, FitSettings, name)
    p.set_defaults(func=label)

    p = sub.add_parser("train", help="pseudo labels + router training on a train split (dev carved from it), or "
                       "on several collection splits together")
    data_args(p, "train", several=True)
    p.add_argument("--out", required=True, help="router .safetensors")
    for f in fields(FitSettings):
        add_field(p, FitSettings, f.name)
    p.set_defaults(func=train)
