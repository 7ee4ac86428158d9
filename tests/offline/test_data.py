"""Collections in BEIR layout, TREC run files and the dev split."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from routehead.errors import RouteheadError
from routehead.offline.data import (
    Collection,
    available_splits,
    doc_text,
    load_collection,
    split_dev,
)
from routehead.offline.trec import read_run, write_run

DATA = Path(__file__).resolve().parents[3] / "shared" / "data"


def make_collection(
    root: Path,
    *,
    corpus: list[dict] | None = None,
    queries: list[dict] | None = None,
    qrels: str | None = None,
    candidates: str | None = None,
    split: str = "test",
) -> Path:
    """Write a tiny collection; every part can be overridden to inject a fault."""
    root.mkdir(parents=True, exist_ok=True)
    if corpus is None:
        corpus = [
            {"_id": "d1", "title": "Cats", "text": "Cats purr."},
            {"_id": "d2", "title": "", "text": "Dogs bark."},
            {"_id": "d3", "title": "Birds.", "text": "Birds sing."},
            {"_id": "d4", "title": "", "text": "   "},
        ]
    if queries is None:
        queries = [
            {"_id": "q1", "text": "cat sounds"},
            {"_id": "q2", "text": "dog sounds"},
            {"_id": "q3", "text": "unjudged query"},
        ]
    if qrels is None:
        qrels = "query-id\tcorpus-id\tscore\nq1\td1\t2\nq1\td3\t0\nq2\td2\t1\nq2\tdX\t1\n"
    (root / "corpus.jsonl").write_text("".join(json.dumps(d) + "\n" for d in corpus))
    (root / "queries.jsonl").write_text("".join(json.dumps(q) + "\n" for q in queries))
    (root / "qrels").mkdir(exist_ok=True)
    (root / "qrels" / f"{split}.tsv").write_text(qrels)
    if candidates is not None:
        (root / "candidates.tsv").write_text(candidates)
    return root


def test_load_tiny_collection(tmp_path: Path) -> None:
    col = load_collection(make_collection(tmp_path / "tiny"))
    assert isinstance(col, Collection)
    assert col.name == "tiny" and col.split == "test"
    assert list(col.queries) == ["q1", "q2"]  # q3 has no qrels in the split
    assert col.qrels == {"q1": {"d1": 2, "d3": 0}, "q2": {"d2": 1, "dX": 1}}
    assert col.candidates is None
    assert col.doc_text("d1") == "Cats. Cats purr."
    assert col.doc_text("d2") == "Dogs bark."
    assert col.doc_text("d3") == "Birds. Birds sing."  # no ".." after a title ending in "."
    assert col.doc_text("d4") == ""
    joined = " | ".join(col.warnings)
    assert "1 qrels rows (1 distinct docs)" in joined  # dX kept in qrels, counted
    assert "1 documents have neither title nor text" in joined
    with pytest.raises(RouteheadError, match="unknown document"):
        col.doc_text("nope")


def test_doc_text_rule() -> None:
    assert doc_text({"title": " T ", "text": " body "}) == "T. body"
    assert doc_text({"title": "Why?", "text": "Because."}) == "Why? Because."
    assert doc_text({"title": "Only title", "text": ""}) == "Only title"
    assert doc_text({"text": "no title key"}) == "no title key"


def test_qrels_without_header(tmp_path: Path) -> None:
    col = load_collection(make_collection(tmp_path / "c", qrels="q1\td1\t1\n"))
    assert col.qrels == {"q1": {"d1": 1}}


def test_candidates_sorted_by_rank(tmp_path: Path) -> None:
    cands = "query-id\tcorpus-id\trank\tscore\nq1\td2\t2\t1.5\nq1\td1\t1\t3.0\nq3\td1\t1\t9\n"
    col = load_collection(make_collection(tmp_path / "c", candidates=cands))
    assert col.candidates == {"q1": ["d1", "d2"], "q2": []}  # q3 is outside the split
    assert col.candidate_scores == {"q1": [3.0, 1.5], "q2": []}
    assert any("no candidates" in w for w in col.warnings)


def test_available_splits(tmp_path: Path) -> None:
    root = make_collection(tmp_path / "c")
    (root / "qrels" / "train.tsv").write_text("q1\td1\t1\n")
    assert available_splits(root) == ["test", "train"]
    assert load_collection(root, "train").queries == {"q1": "cat sounds"}
    with pytest.raises(RouteheadError, match="available splits: test, train"):
        load_collection(root, "dev")


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"qrels": "q1\td1\n"}, r"qrels/test.tsv:1: expected 3 tab-separated columns"),
        ({"qrels": "query-id\tcorpus-id\tscore\nq1\td1\t1\nq1\td2\thigh\n"}, r"test.tsv:3: relevance score"),
        ({"qrels": "q1\td1\t1.5\n"}, r"test.tsv:1: relevance score must be an integer"),
        ({"qrels": "q1\td1\t1\nq9\td1\t1\n"}, r"test.tsv:2: query id 'q9' is not in queries.jsonl"),
        ({"qrels": "q1\td1\t1\nq1\td1\t2\n"}, r"test.tsv:2: .*judged twice with different scores"),
        ({"candidates": "q1\tdZ\t1\t1.0\n"}, r"candidates.tsv:1: candidate document 'dZ'"),
        ({"candidates": "q7\td1\t1\t1.0\n"}, r"candidates.tsv:1: query id 'q7'"),
        ({"candidates": "q1\td1\t1\t1.0\nq1\td2\t1\t0.5\n"}, r"candidates.tsv:2: rank 1 used twice"),
        ({"candidates": "q1\td1\tfirst\t1.0\n"}, r"candidates.tsv:1: rank must be an integer"),
        ({"candidates": "q1\td1\t1\n"}, r"candidates.tsv:1: expected 4"),
        ({"corpus": [{"_id": "d1", "text": "a"}, {"_id": "d1", "text": "b"}]}, r"corpus.jsonl:2: duplicate"),
        (
            {"queries": [{"_id": "q1", "text": "a"}, {"_id": "q1", "text": "b"}]},
            r"queries.jsonl:2: duplicate",
        ),
        ({"corpus": [{"_id": "d1", "text": 5}]}, r"corpus.jsonl:1: field 'text' must be a string"),
        ({"corpus": [{"text": "no id"}]}, r"corpus.jsonl:1: .*'_id'"),
    ],
)
def test_bad_files_raise_with_location(tmp_path: Path, kwargs: dict, pattern: str) -> None:
    with pytest.raises(RouteheadError, match=pattern):
        load_collection(make_collection(tmp_path / "c", **kwargs))


def test_malformed_json_line(tmp_path: Path) -> None:
    root = make_collection(tmp_path / "c")
    with open(root / "corpus.jsonl", "a") as fh:
        fh.write('{"_id": "d9", "text": \n')
    with pytest.raises(RouteheadError, match=r"corpus.jsonl:5: malformed JSON"):
        load_collection(root)


def test_identical_duplicate_qrels_are_counted(tmp_path: Path) -> None:
    col = load_collection(make_collection(tmp_path / "c", qrels="q1\td1\t1\nq1\td1\t1\n"))
    assert col.qrels == {"q1": {"d1": 1}}
    assert any("1 duplicate qrels rows" in w for w in col.warnings)


def test_missing_folder_and_files(tmp_path: Path) -> None:
    with pytest.raises(RouteheadError, match="collection folder not found"):
        load_collection(tmp_path / "nope")
    root = make_collection(tmp_path / "c")
    (root / "queries.jsonl").unlink()
    with pytest.raises(RouteheadError, match="missing queries file"):
        load_collection(root)


# ------------------------------------------------------------------------------------------- runs


def test_run_round_trip_and_tie_order(tmp_path: Path) -> None:
    run = {"q2": {"b": 1.0, "a": 1.0, "c": 2.5}, "q1": {"x": 0.1}}
    path = tmp_path / "sub" / "run.txt"
    write_run(path, run, "bm25")
    lines = path.read_text().splitlines()
    assert lines == [
        "q1 Q0 x 1 0.1 bm25",
        "q2 Q0 c 1 2.5 bm25",
        "q2 Q0 a 2 1.0 bm25",  # tie broken by doc id
        "q2 Q0 b 3 1.0 bm25",
    ]
    assert read_run(path) == run
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.parametrize(
    ("text", "pattern"),
    [
        ("q1 Q0 d1 1 0.5\n", r"run.txt:1: expected 6 fields"),
        ("q1 Q0 d1 1 0.5 t\nq1 Q0 d2 x 0.4 t\n", r"run.txt:2: rank must be an integer"),
        ("q1 Q0 d1 1 abc t\n", r"run.txt:1: score must be a number"),
        ("q1 Q0 d1 1 0.5 t\nq1 Q0 d1 2 0.4 t\n", r"run.txt:2: document 'd1' appears twice"),
    ],
)
def test_read_run_errors(tmp_path: Path, text: str, pattern: str) -> None:
    path = tmp_path / "run.txt"
    path.write_text(text)
    with pytest.raises(RouteheadError, match=pattern):
        read_run(path)


def test_write_run_rejects_bad_input(tmp_path: Path) -> None:
    with pytest.raises(RouteheadError, match="tag"):
        write_run(tmp_path / "r", {"q": {"d": 1.0}}, "two words")
    with pytest.raises(RouteheadError, match="not finite"):
        write_run(tmp_path / "r", {"q": {"d": float("nan")}}, "t")


# ------------------------------------------------------------------------------------------ split


def test_split_dev_is_deterministic_and_disjoint() -> None:
    ids = [f"q{i}" for i in range(50)]
    train, dev = split_dev(ids, 0.2, seed=3)
    assert len(dev) == 10 and len(train) == 40
    assert set(train) | set(dev) == set(ids) and not set(train) & set(dev)
    assert split_dev(list(reversed(ids)), 0.2, seed=3) == (train, dev)  # input order does not matter
    assert split_dev(ids, 0.2, seed=4) != (train, dev)
    assert split_dev(["a", "b"], 0.1)[1] != []  # at least one dev id
    with pytest.raises(RouteheadError):
        split_dev(ids, 1.0)
    with pytest.raises(RouteheadError, match="duplicates"):
        split_dev(["a", "a"], 0.5)


# -------------------------------------------------------------------------------------- real data


@pytest.mark.skipif(not DATA.is_dir(), reason="shared data not available")
@pytest.mark.parametrize(
    ("name", "docs", "queries", "pairs"),
    [
        ("scifact", 5183, 300, 339),
        ("trec-dl19-passage", 4297, 43, 9260),
        ("cranfield", 1400, 225, 1837),
        ("cisi", 1460, 76, 3114),
        ("med", 1033, 30, 696),
        ("adi", 82, 35, 170),
    ],
)
def test_real_collections_load(name: str, docs: int, queries: int, pairs: int) -> None:
    col = load_collection(DATA / name)
    assert len(col.corpus) == docs
    assert len(col.queries) == queries
    assert sum(len(j) for j in col.qrels.values()) == pairs
    if name == "trec-dl19-passage":
        assert col.candidates is not None and all(len(c) == 100 for c in col.candidates.values())
        assert any(w.startswith("7003 qrels rows") for w in col.warnings)
    else:
        assert col.candidates is None


@pytest.mark.skipif(not (DATA / "scifact").is_dir(), reason="shared data not available")
def test_scifact_train_split() -> None:
    assert available_splits(DATA / "scifact") == ["test", "train"]
    assert len(load_collection(DATA / "scifact", "train").queries) == 809
