"""TREC run files: written byte-for-byte reproducibly (and atomically), read back with every line checked."""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path

from routehead.errors import RouteheadError
from routehead.offline.data import id_sort_key, parse_int


def _sorted_items(docs: dict[str, float]) -> list[tuple[str, float]]:
    """Best first; equal scores ordered by doc id so runs are reproducible byte for byte."""
    return sorted(docs.items(), key=lambda kv: (-kv[1], kv[0]))


def write_run(path: str | Path, run: dict[str, dict[str, float]], tag: str) -> None:
    """Write a TREC run file (``qid Q0 docid rank score tag``), one line per retrieved document.

    Queries are written in id order and documents by descending score, ties broken by doc id, so the
    same run always gives the same file. The file is written to a temporary name and then renamed, so
    an interrupted write never leaves a truncated run behind.
    """
    if not tag or any(c.isspace() for c in tag):
        raise RouteheadError(f"run tag must be non-empty and contain no whitespace, got {tag!r}")
    lines = []
    for qid in sorted(run, key=id_sort_key):
        if not qid or any(c.isspace() for c in qid):
            raise RouteheadError(f"query id {qid!r} is empty or contains whitespace")
        for rank, (did, score) in enumerate(_sorted_items(run[qid]), 1):
            if not did or any(c.isspace() for c in did):
                raise RouteheadError(f"doc id {did!r} (query {qid}) is empty or contains whitespace")
            score = float(score)
            if not math.isfinite(score):
                raise RouteheadError(f"score of ({qid}, {did}) is not finite: {score}")
            lines.append(f"{qid} Q0 {did} {rank} {score!r} {tag}\n")
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.writelines(lines)
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def read_run(path: str | Path) -> dict[str, dict[str, float]]:
    """Read a TREC run file into ``{qid: {docid: score}}`` (the rank column is checked, not used)."""
    path = Path(path)
    if not path.is_file():
        raise RouteheadError(f"run file not found: {path}")
    run: dict[str, dict[str, float]] = {}
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) != 6:
                raise RouteheadError(
                    f"{path}:{lineno}: expected 6 fields 'qid Q0 docid rank score tag', found {len(parts)}"
                )
            qid, _, did, rank_s, score_s, _ = parts
            parse_int(rank_s, path, lineno, "rank")
            try:
                score = float(score_s)
            except ValueError:
                raise RouteheadError(f"{path}:{lineno}: score must be a number, got {score_s!r}") from None
            if not math.isfinite(score):
                raise RouteheadError(f"{path}:{lineno}: score is not finite: {score_s!r}")
            docs = run.setdefault(qid, {})
            if did in docs:
                raise RouteheadError(f"{path}:{lineno}: document {did!r} appears twice for query {qid!r}")
            docs[did] = score
    return run
