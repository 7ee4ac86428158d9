"""Issue #35's goal, one table: where is there honest per-query headroom, and how much of it does the router take?

    python bench/headroom_table.py --loco results/loco-smollm2-135m-reverse-set-shared.json \
        results/loco-gemma3-270m-reverse-set-shared.json --orders reverse shuffle

For every held-out collection of each ``bench/loco.py`` run (its own order and its ``--eval-orders``), on the
queries that run held out: the split-judgment oracle (a head chosen per query on half of its relevant candidates,
scored on the other half; :func:`routehead.evaluation.headroom.split_judgment_gap`) against the run's strongest
static selection there (the best of QRHead, CoRe, the layer window and the single head on those very queries, an
in-sample pick that favours the static side), and the leave-one-collection-out router (``route-loco``, which
never saw the collection) scored on the same halves of the same splits; "closed" is the router's gain over the
oracle's (the router may route the first-stage score, which the oracle's single heads are not, so it can exceed
1). Headroom p-values are adjusted for the number of cells looked at (Benjamini-Hochberg over every row of
the table, ``scipy.stats.false_discovery_control``): a cell "shows headroom" when its adjusted p is below 0.05.
Routing diversity is the run's own in that order: the share of the held-out queries given the most common head
set (the goal asks for no more than half where there is headroom). Beside it, route-loco against the learned linear
combination of heads fitted on the same training queries (``linear`` in the run, full judgments, paired t-test):
the other baseline the issue names.

Stored passes only. Writes results/headroom-table.json and prints the table in Markdown.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

import numpy as np
from scipy.stats import false_discovery_control

sys.path.insert(0, str(Path(__file__).resolve().parent))

from loco import load_store  # noqa: E402

from routehead.evaluation.headroom import split_judgment_gap  # noqa: E402
from routehead.evaluation.runs import save_json, sc_identity  # noqa: E402
from routehead.metrics import ndcg_at_k, order_scores  # noqa: E402
from routehead.offline.collect import ScoredCollection  # noqa: E402
from routehead.offline.views import gains  # noqa: E402
from routehead.selection import load_method  # noqa: E402
from routehead.settings import SCORING  # noqa: E402


def held_queries(sc: ScoredCollection, ranking: dict[str, list[int]], per_query: dict[str, float]
                 ) -> ScoredCollection:
    """``sc`` cut to the queries the LOCO run held out (a store may have grown since), after checking that each
    recorded ranking reproduces the run's nDCG@10 on this store (same candidates, same judgments)."""
    missing = sorted(set(ranking) - set(sc.entries))
    if missing:
        raise SystemExit(f"{sc.collection.name}: {len(missing)} ranked queries are not stored (e.g. {missing[0]})")
    for q, order in ranking.items():
        got = float(ndcg_at_k(order_scores(order)[None], *gains(sc, q, sc.entries[q].doc_ids), 10)[0])
        if abs(got - per_query[q]) > 1e-5:
            raise SystemExit(f"{sc.collection.name} {q}: the ranking gives nDCG@10 {got:.6f}, the run {per_query[q]}")
    sc.entries = {q: sc.entries[q] for q in sorted(ranking)}
    return sc


def cells(loco: dict, orders: list[str]) -> list[tuple[str, str, dict]]:
    """(order, collection, the run's record) for every held-out collection of a LOCO run in ``orders``."""
    out = []
    for order in orders:
        block = loco["held_out"] if order == loco["doc_order"] else loco.get("orders", {}).get(order, {})
        out += [(order, name, rec) for name, rec in block.items() if name != "pooled"]
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--loco", nargs="+", required=True, help="bench/loco.py JSON files (with route-loco rankings)")
    ap.add_argument("--orders", nargs="+", default=["reverse", "shuffle", "input"])
    ap.add_argument("--data-root", default="../shared/data")
    ap.add_argument("--model", nargs="*", default=[], metavar="NAME=SPEC",
                    help="load a run's model (its JSON's name) from SPEC, e.g. a local folder")
    ap.add_argument("--top-k", type=int, default=SCORING.top_k, help="as the LOCO runs' stores were scored")
    ap.add_argument("--max-doc-tokens", type=int, default=SCORING.max_doc_tokens)
    ap.add_argument("--assets", nargs="*", default=[], metavar="METHOD=PATH",
                    help="a fixed method's asset other than the shipped (as the LOCO runs had it)")
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--alpha", type=float, default=0.05)
    ap.add_argument("--out", default="results/headroom-table.json")
    args = ap.parse_args(argv)
    spec_of = dict(m.split("=", 1) for m in args.model)
    assets = dict(a.split("=", 1) for a in args.assets)
    rows = []
    for path in args.loco:
        loco = json.loads(Path(path).read_text())
        scorer = None
        for order, name, rec in cells(loco, args.orders):
            if "ranking" not in rec:
                raise SystemExit(f"{path}: no route-loco rankings (re-run bench/loco.py)")
            coll, split = name.rsplit("/", 1)
            ns = argparse.Namespace(model=spec_of.get(loco["model"], loco["model"]), dtype="float32",
                                    max_queries=None, doc_order=order, top_k=args.top_k,
                                    max_doc_tokens=args.max_doc_tokens, no_compute=True)
            sc, scorer, why = load_store(f"{args.data_root}/{coll}:{split}", ns, scorer, split)
            if sc is None:
                raise SystemExit(f"{name} {order}: {why}")
            sc = held_queries(sc, rec["ranking"]["route-loco"], rec["per_query"]["route-loco"])
            strongest = rec["strongest_static"]
            baseline = load_method(strongest, sc_identity(sc, scorer), heads=assets.get(strongest)).select()
            gap = split_judgment_gap(sc, baseline, rec["ranking"]["route-loco"], seeds=args.seeds)
            routing = rec.get("routing", {}).get("route-loco")
            vs_linear = rec.get("vs", {}).get("route-loco", {}).get("linear")  # full judgments; older runs: none
            rows.append({"model": loco["model"], "order": order, "collection": name, "queries": rec["queries"],
                         "judged_twice": gap.headroom.queries, "strongest_static": strongest,
                         "oracle": gap.headroom.oracle, "baseline": gap.headroom.baseline,
                         "headroom": gap.headroom.gain, "p_headroom": gap.headroom.p_value,
                         "router": gap.router.oracle, "router_gain": gap.router.gain,
                         "p_router": gap.router.p_value, "closed": gap.closed,
                         "most_common_set_share": None if routing is None else routing["most_common_share"],
                         "vs_linear": None if vs_linear is None else vs_linear["delta"],
                         "p_vs_linear": None if vs_linear is None else vs_linear["p"],
                         "loco": path})
            print(json.dumps(rows[-1]), flush=True)
    ps = np.array([r["p_headroom"] for r in rows])
    ok = np.isfinite(ps)
    q = np.full(len(rows), np.nan)
    if ok.any():
        q[ok] = false_discovery_control(ps[ok], method="bh")
    for r, v in zip(rows, q):
        r["q_headroom"] = float(v)
        r["shows_headroom"] = bool(v < args.alpha and r["headroom"] > 0)
    res = {"date": datetime.date.today().isoformat(), "command": "python bench/headroom_table.py " +
           " ".join(argv if argv is not None else sys.argv[1:]), "seeds": args.seeds, "alpha": args.alpha,
           "adjustment": "Benjamini-Hochberg over every row", "rows": rows}
    save_json(res, Path(args.out))
    print(markdown(rows))
    return res


def markdown(rows: list[dict]) -> str:
    """The table as BENCHMARKS.md shows it ("closed" only where there is headroom to close; the JSON has all)."""
    def f(x: float | None, fmt: str) -> str:
        return "-" if x is None or not np.isfinite(x) else format(x, fmt)
    lines = ["| model | order | collection | queries (judged twice) | strongest static | headroom (p, adjusted) | "
             "route-loco gain (p) | closed | most common set | route-loco vs linear (p) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        star = "**" if r["shows_headroom"] else ""
        lines.append(f"| {r['model']} | {r['order']} | {r['collection']} | {r['queries']} ({r['judged_twice']}) | "
                     f"{r['strongest_static']} | {star}{f(r['headroom'], '+.3f')} ({f(r['p_headroom'], '.2g')}, "
                     f"{f(r['q_headroom'], '.2g')}){star} | {f(r['router_gain'], '+.3f')} "
                     f"({f(r['p_router'], '.2g')}) | {f(r['closed'] if r['shows_headroom'] else None, '.2f')} | "
                     f"{f(r['most_common_set_share'], '.0%')} | {f(r.get('vs_linear'), '+.3f')} "
                     f"({f(r.get('p_vs_linear'), '.2g')}) |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
