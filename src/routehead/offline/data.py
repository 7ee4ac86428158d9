"""Test collections in the BEIR folder layout, TREC run files and a deterministic dev split.

A collection folder holds ``corpus.jsonl`` (``_id``, ``title``, ``text``), ``queries.jsonl``
(``_id``, ``text``), ``qrels/<split>.tsv`` (``query-id  corpus-id  score``) and, for re-ranking sets
such as TREC DL, an optional ``candidates.tsv`` (``query-id  corpus-id  rank  score``) holding the
first-stage pool. Every problem in these files is reported as a :class:`RouteheadError` that names the
file and line, because a silently skipped row changes every number computed downstream.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

from routehead.errors import RouteheadError

__all__ = [
    "Collection",
    "available_splits",
    "doc_text",
    "load_collection",
    "split_dev",
]

_QRELS_HEADER = ("query-id", "corpus-id", "score")
_CANDIDATES_HEADER = ("query-id", "corpus-id", "rank", "score")


def doc_text(doc: dict) -> str:
    """The text a model sees for a document: ``title. text`` (or just the text when untitled).

    One rule shared by BM25, the dense baseline and the LLM re-rankers, so all of them read the same
    words. When the title already ends in sentence punctuation no extra period is added (SciFact and
    Cranfield titles mostly end in "."), which avoids a spurious "..".
    """
    title = (doc.get("title") or "").strip()
    text = (doc.get("text") or "").strip()
    if not title:
        return text
    if not text:
        return title
    sep = " " if title[-1] in ".!?:;" else ". "
    return f"{title}{sep}{text}"


@dataclass
class Collection:
    """A test collection restricted to one qrels split.

    ``queries`` holds only the queries judged in ``split``, in ``queries.jsonl`` order. ``candidates``
    (query id -> doc ids in first-stage order) and ``candidate_scores`` (the matching first-stage scores)
    come from ``candidates.tsv`` when the folder has one, else they are ``None``. ``warnings`` lists counted,
    non-fatal oddities of the data (e.g. judged documents missing from the corpus).
    """

    name: str
    corpus: dict[str, dict]
    queries: dict[str, str]
    qrels: dict[str, dict[str, int]]
    candidates: dict[str, list[str]] | None
    path: Path
    split: str
    candidate_scores: dict[str, list[float]] | None = None
    warnings: list[str] = field(default_factory=list)

    def doc_text(self, doc_id: str) -> str:
        """The document as models see it (see :func:`doc_text`)."""
        try:
            doc = self.corpus[doc_id]
        except KeyError:
            raise RouteheadError(f"{self.name}: unknown document id {doc_id!r}") from None
        return doc_text(doc)

    def prompt_text(self, doc_id: str, layout: str = "reference") -> str:
        """The document as the LLM re-rankers put it in the prompt: ``title + "\\n" + text`` (the references'),
        or ``title. text`` under the v1 prompt layout (:mod:`routehead.engine.prompt`)."""
        from routehead.engine.prompt import document_text

        if layout == "v1":
            return self.doc_text(doc_id)
        try:
            doc = self.corpus[doc_id]
        except KeyError:
            raise RouteheadError(f"{self.name}: unknown document id {doc_id!r}") from None
        return document_text(doc.get("text") or "", doc.get("title"))

    def __repr__(self) -> str:  # the default repr would print the whole corpus
        cand = "none" if self.candidates is None else f"{len(self.candidates)} queries"
        return (
            f"Collection(name={self.name!r}, split={self.split!r}, docs={len(self.corpus)}, "
            f"queries={len(self.queries)}, candidates={cand}, warnings={len(self.warnings)})"
        )


def available_splits(path: str | Path) -> list[str]:
    """Names of the qrels splits in a collection folder (``qrels/<split>.tsv``), sorted."""
    qdir = Path(path) / "qrels"
    if not qdir.is_dir():
        raise RouteheadError(f"{path}: not a collection folder (no qrels/ directory)")
    return sorted(p.stem for p in qdir.glob("*.tsv") if p.is_file())


def _require_file(path: Path, what: str) -> Path:
    if not path.is_file():
        raise RouteheadError(f"missing {what}: {path}")
    return path


def _read_jsonl(path: Path, what: str, fields: tuple[str, ...]) -> dict[str, dict]:
    """Rows of a JSON-lines file keyed by ``_id``; ids must be unique and listed fields strings."""
    out: dict[str, dict] = {}
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise RouteheadError(f"{path}:{lineno}: malformed JSON in {what} ({exc.msg})") from None
            if not isinstance(row, dict) or "_id" not in row:
                raise RouteheadError(f"{path}:{lineno}: {what} row must be a JSON object with an '_id'")
            rid = row["_id"]
            if isinstance(rid, bool) or not isinstance(rid, (str, int)):
                raise RouteheadError(f"{path}:{lineno}: '_id' must be a string, got {rid!r}")
            rid = str(rid)
            if not rid or any(c.isspace() for c in rid):
                raise RouteheadError(f"{path}:{lineno}: '_id' {rid!r} is empty or contains whitespace")
            if rid in out:
                raise RouteheadError(f"{path}:{lineno}: duplicate {what} id {rid!r}")
            clean = {}
            for f in fields:
                value = row.get(f, "")
                if value is None:
                    value = ""
                if not isinstance(value, str):
                    raise RouteheadError(f"{path}:{lineno}: field {f!r} must be a string, got {value!r}")
                clean[f] = value
            out[rid] = clean
    return out


def _tsv_rows(path: Path, header: tuple[str, ...]):
    """Yield ``(lineno, fields)`` for a tab-separated file, skipping blank lines and the header line.

    The header is optional: the first line is taken as a header only when its first field equals the
    expected one (``query-id``), so header-less qrels still load.
    """
    ncol = len(header)
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            parts = line.split("\t")
            if lineno == 1 and parts and parts[0].strip() == header[0]:
                continue
            if len(parts) != ncol:
                raise RouteheadError(
                    f"{path}:{lineno}: expected {ncol} tab-separated columns ({', '.join(header)}), found {len(parts)}"
                )
            yield lineno, [p.strip() for p in parts]


def parse_int(value: str, path: Path, lineno: int, what: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise RouteheadError(f"{path}:{lineno}: {what} must be an integer, got {value!r}") from None


def load_collection(path: str | Path, split: str = "test") -> Collection:
    """Load a BEIR-layout collection for one qrels split.

    Only the queries judged in ``split`` are kept (a BEIR ``queries.jsonl`` holds the queries of all
    splits). Judged documents absent from the corpus are kept in ``qrels`` and counted in
    ``Collection.warnings``: re-ranking sets such as TREC DL ship only the candidate pool, so such
    documents can never be retrieved but still count in recall and the ideal DCG. Empty documents are
    kept and counted too. Everything else that is inconsistent (unknown query ids, unknown candidate
    documents, duplicates, bad rows) raises :class:`RouteheadError` naming the file and line.
    """
    root = Path(path)
    if not root.is_dir():
        raise RouteheadError(f"collection folder not found: {root}")
    name = root.resolve().name
    corpus_file = _require_file(root / "corpus.jsonl", "corpus file")
    queries_file = _require_file(root / "queries.jsonl", "queries file")
    qrels_file = root / "qrels" / f"{split}.tsv"
    if not qrels_file.is_file():
        splits = available_splits(root) if (root / "qrels").is_dir() else []
        raise RouteheadError(
            f"missing qrels for split {split!r}: {qrels_file} (available splits: {', '.join(splits) or 'none'})"
        )

    corpus = _read_jsonl(corpus_file, "document", ("title", "text"))
    all_queries = {qid: row["text"] for qid, row in _read_jsonl(queries_file, "query", ("text",)).items()}
    warnings: list[str] = []

    qrels: dict[str, dict[str, int]] = {}
    missing_docs: set[str] = set()
    missing_rows = 0
    duplicate_rows = 0
    for lineno, (qid, did, score) in _tsv_rows(qrels_file, _QRELS_HEADER):
        grade = parse_int(score, qrels_file, lineno, "relevance score")
        if qid not in all_queries:
            raise RouteheadError(f"{qrels_file}:{lineno}: query id {qid!r} is not in {queries_file.name}")
        judged = qrels.setdefault(qid, {})
        if did in judged:
            if judged[did] != grade:
                raise RouteheadError(
                    f"{qrels_file}:{lineno}: ({qid}, {did}) judged twice with different scores "
                    f"({judged[did]} and {grade})"
                )
            duplicate_rows += 1
            continue
        judged[did] = grade
        if did not in corpus:
            missing_docs.add(did)
            missing_rows += 1
    if not qrels:
        raise RouteheadError(f"{qrels_file}: no judgements")
    if missing_rows:
        warnings.append(
            f"{missing_rows} qrels rows ({len(missing_docs)} distinct docs) judge documents that are not in "
            f"{corpus_file.name}; they are kept in the qrels but can never be retrieved"
        )
    if duplicate_rows:
        warnings.append(f"{duplicate_rows} duplicate qrels rows (same query, doc and score) were ignored")
    no_rel = sum(1 for judged in qrels.values() if max(judged.values()) <= 0)
    if no_rel:
        warnings.append(f"{no_rel} queries have no relevant (score > 0) document; they score 0 on every metric")

    queries = {qid: text for qid, text in all_queries.items() if qid in qrels}  # queries.jsonl order
    empty_q = sum(1 for text in queries.values() if not text.strip())
    if empty_q:
        warnings.append(f"{empty_q} queries have empty text")
    empty_docs = sum(1 for doc in corpus.values() if not doc_text(doc))
    if empty_docs:
        warnings.append(f"{empty_docs} documents have neither title nor text (kept)")

    candidates = candidate_scores = None
    cand_file = root / "candidates.tsv"
    if cand_file.is_file():
        candidates, candidate_scores, cand_warnings = _read_candidates(cand_file, queries, all_queries, corpus)
        warnings.extend(cand_warnings)

    return Collection(
        name=name,
        corpus=corpus,
        queries=queries,
        qrels=qrels,
        candidates=candidates,
        path=root,
        split=split,
        candidate_scores=candidate_scores,
        warnings=warnings,
    )


def id_sort_key(qid: str) -> tuple[int, int | str]:
    """Numeric ids in numeric order, then the rest alphabetically (stable, human-friendly order)."""
    return (0, int(qid)) if qid.isdigit() else (1, qid)


def _read_candidates(
    path: Path, queries: dict[str, str], all_queries: dict[str, str], corpus: dict[str, dict]
) -> tuple[dict[str, list[str]], dict[str, list[float]], list[str]]:
    rows: dict[str, list[tuple[int, str, float]]] = {}
    seen: dict[str, dict[str, int]] = {}
    for lineno, (qid, did, rank_s, score_s) in _tsv_rows(path, _CANDIDATES_HEADER):
        rank = parse_int(rank_s, path, lineno, "rank")
        try:
            score = float(score_s)
        except ValueError:
            raise RouteheadError(f"{path}:{lineno}: score must be a number, got {score_s!r}") from None
        if qid not in all_queries:
            raise RouteheadError(f"{path}:{lineno}: query id {qid!r} is not in queries.jsonl")
        if did not in corpus:
            raise RouteheadError(f"{path}:{lineno}: candidate document {did!r} is not in corpus.jsonl")
        ranks = seen.setdefault(qid, {})
        if did in ranks:
            raise RouteheadError(f"{path}:{lineno}: document {did!r} listed twice for query {qid!r}")
        if rank in ranks.values():
            raise RouteheadError(f"{path}:{lineno}: rank {rank} used twice for query {qid!r}")
        ranks[did] = rank
        if qid in queries:  # candidates of queries outside this split are ignored
            rows.setdefault(qid, []).append((rank, did, score))
    candidates: dict[str, list[str]] = {}
    scores: dict[str, list[float]] = {}
    for qid in queries:
        ordered = sorted(rows.get(qid, []))
        candidates[qid] = [did for _, did, _ in ordered]
        scores[qid] = [s for _, _, s in ordered]
    warnings = []
    empty = sum(1 for c in candidates.values() if not c)
    if empty:
        warnings.append(f"{empty} judged queries have no candidates in {path.name}; they score 0")
    return candidates, scores, warnings


# --------------------------------------------------------------------------------------------------
# splits


def split_dev(query_ids: list[str], dev_fraction: float = 0.2, seed: int = 0) -> tuple[list[str], list[str]]:
    """Split query ids into (train, dev), reproducibly: sort, shuffle with ``seed``, cut.

    Sorting first makes the result independent of the input order. The dev part gets
    ``round(n * dev_fraction)`` ids (at least one when ``dev_fraction > 0`` and n >= 2). Both lists are
    returned sorted.
    """
    if not 0.0 <= dev_fraction < 1.0:
        raise RouteheadError(f"dev_fraction must be in [0, 1), got {dev_fraction}")
    ids = sorted(query_ids)
    if len(set(ids)) != len(ids):
        raise RouteheadError("split_dev: query ids contain duplicates")
    n_dev = round(len(ids) * dev_fraction)
    if dev_fraction > 0 and n_dev == 0 and len(ids) >= 2:
        n_dev = 1
    random.Random(seed).shuffle(ids)
    dev = sorted(ids[:n_dev])
    train = sorted(ids[n_dev:])
    return train, dev
