"""Issue #34's table from the evaluation files: every method's nDCG@10 per collection and prompt order, one
markdown table per model, read from ``results/field-methods-<model>-<collection>-<order>.json`` (written by
``routehead evaluate ... --out``; the commands are in BENCHMARKS.md).

    python bench/field_table.py [--model smollm2-135m] [--results results]

A cell is the mean nDCG@10 over the collection's evaluated queries (their number in the header); ``*`` marks
the best attention method of the row (BM25 and position excluded), ``-`` a run not made yet.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

ORDERS = ("shuffle", "reverse", "input")
COLLECTIONS = ("scifact", "trec-dl19-passage", "cranfield", "cisi", "med", "adi")
BASELINES = ("bm25", "position")


def load(results: Path, model: str) -> dict[tuple[str, str], dict]:
    """``{(collection, order): evaluation report}`` for the files present."""
    out = {}
    for c in COLLECTIONS:
        for o in ORDERS:
            p = results / f"field-methods-{model}-{c}-{o}.json"
            if p.is_file():
                out[(c, o)] = json.loads(p.read_text())
    return out


def table(reports: dict[tuple[str, str], dict]) -> str:
    """The markdown table: one row per (collection, order), one column per method."""
    rows = [k for k in ((c, o) for c in COLLECTIONS for o in ORDERS) if k in reports]
    methods: list[str] = []
    for k in rows:
        methods += [m for m in reports[k]["rerankers"] if m not in methods]
    lines = ["| collection | order | queries | " + " | ".join(methods) + " |", "|" + "---|" * (len(methods) + 3)]
    for c, o in rows:
        r = reports[(c, o)]["rerankers"]
        attn = [m for m in r if m not in BASELINES]
        best = max(attn, key=lambda m: r[m]["metrics"]["ndcg@10"]) if attn else None
        cells = ["-" if m not in r else f"{r[m]['metrics']['ndcg@10']:.3f}" + ("*" if m == best else "")
                 for m in methods]
        lines.append(f"| {c} | {o} | {reports[(c, o)]['n_queries']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--results", default="results")
    args = ap.parse_args(argv)
    text = table(load(Path(args.results), args.model))
    print(text)
    return text


if __name__ == "__main__":
    main()
