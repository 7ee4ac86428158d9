"""Command line: ``routehead rerank | score | evaluate | detect | label | train | plot | serve``.

Each command is a module here with ``register(subparsers)``; the options shared by several commands are
derived from the settings dataclasses (:mod:`routehead.cli.options`). Importing this package loads no torch,
so ``routehead --help`` is quick.
"""

from __future__ import annotations

import argparse
import sys

from routehead.cli import evaluate, offline, rerank, serve
from routehead.cli.inputs import highlight, read_documents
from routehead.errors import RouteheadError

__all__ = ["build_parser", "highlight", "main", "read_documents"]


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="routehead", description="Attention-based re-ranking with LLMs: ICR, static "
                                 "heads (QRHead) and per-query head routing (RouteHead).")
    sub = ap.add_subparsers(dest="command", required=True)
    rerank.register(sub)
    offline.register(sub)
    evaluate.register(sub)
    serve.register(sub)
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
