"""A shipped router against the strongest static selection, per collection and pooled, in one prompt order (issue
#35's goal: "never significantly below the strongest static selection"), on stored passes only.

    python bench/router_vs_static.py --model gemma3-270m --doc-order reverse \
        --collections ../shared/data/{scifact,trec-dl19-passage,cranfield,cisi,med}:test

"Strongest static": the best of QRHead, CoRe, the layer window and the single head on these very queries (an
in-sample pick that favours the static side; bench/loco.py's comparison, reused). Use it only on collections
the router never saw (its ``trained_on``). Writes results/router-vs-static-<model>-<order>[-<router>].json.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from loco import STATIC, compare, first_stage, load_store, per_query  # noqa: E402

from routehead.evaluation.runs import save_json, sc_identity, trained_here  # noqa: E402
from routehead.selection import load_method  # noqa: E402
from routehead.settings import SCORING  # noqa: E402


def brief(r: dict) -> str:
    """One line: the router, the strongest static selection, their difference and its paired p-value."""
    s = r["strongest_static"]
    return (f"{r['queries']} queries: route {r['ndcg@10']['route']}, {s} {r['ndcg@10'][s]}, "
            f"{r['vs']['route'][s]['delta']:+} (p = {r['vs']['route'][s]['p']}), icr {r['ndcg@10']['icr']}, "
            f"bm25 {r['ndcg@10']['bm25']}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--doc-order", default="reverse")
    ap.add_argument("--router", default=None, help="a router variant or file (default: the model's default)")
    ap.add_argument("--collections", nargs="+", required=True, metavar="PATH[:SPLIT]")
    args = ap.parse_args()
    opts = argparse.Namespace(model=args.model, dtype="float32", doc_order=args.doc_order, top_k=SCORING.top_k,
                              max_doc_tokens=SCORING.max_doc_tokens, max_queries=None, no_compute=True)
    scorer, out, pooled = None, {}, {}
    for spec in args.collections:
        sc, scorer, why = load_store(spec, opts, scorer)
        if sc is None:
            print(f"skipped {spec}: {why}", flush=True)
            continue
        ident, qids = sc_identity(sc, scorer), sorted(sc.entries)
        route = load_method("route", ident, router=args.router)
        why = trained_here(route, sc)
        if why:
            raise SystemExit(f"{spec}: {why}; no test figure there")
        v = {"route": per_query(sc, route, scorer, qids)}
        v.update({m: per_query(sc, load_method(m, ident), scorer, qids) for m in (*STATIC, "icr")})
        v["bm25"] = first_stage(sc, qids)
        for m, x in v.items():
            pooled.setdefault(m, []).append(x)
        out[sc.collection.name] = {"queries": len(qids), **compare(v, ("route",))}
        print(sc.collection.name, brief(out[sc.collection.name]), flush=True)
    out["pooled"] = {"queries": sum(len(x) for x in pooled["route"]),
                     **compare({m: np.concatenate(x) for m, x in pooled.items()}, ("route",))}
    print("pooled", brief(out["pooled"]), flush=True)
    tail = f"-{Path(args.router).stem}" if args.router else ""
    save_json({"model": args.model, "order": args.doc_order, "router": args.router or "default", **out},
              Path("results") / f"router-vs-static-{args.model}-{args.doc_order}{tail}.json")


if __name__ == "__main__":
    main()
