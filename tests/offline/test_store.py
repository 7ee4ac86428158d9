"""Head-score store: round trip, resume, integrity checks and work splitting."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest

from routehead.errors import RouteheadError
from routehead.offline.store import Entry, HeadScoreStore, settings_hash, shard_filter

SETTINGS = {
    "collection": "scifact",
    "split": "test",
    "model": "Qwen/Qwen2.5-0.5B-Instruct",
    "top_k": 20,
    "max_doc_tokens": 300,
    "prompt_version": 1,
}


def tensors(seed: int, docs: int, layers: int = 3, heads: int = 4) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    cal = rng.standard_normal((layers, heads, docs)).astype(np.float32)
    raw = rng.random((layers, heads, docs)).astype(np.float32)
    return cal, raw


def test_layout_and_meta(tmp_path: Path) -> None:
    store = HeadScoreStore(tmp_path, SETTINGS)
    assert store.path == tmp_path / "scifact" / "test" / f"Qwen-Qwen2.5-0.5B-Instruct-{settings_hash(SETTINGS)}"
    assert len(store.hash) == 12
    meta = json.loads((store.path / "meta.json").read_text())
    assert meta["settings"] == SETTINGS and meta["layout"] == ["layer", "head", "doc"] and meta["created"]
    # key order does not change the identity; any value does
    assert settings_hash(dict(reversed(list(SETTINGS.items())))) == store.hash
    assert settings_hash({**SETTINGS, "top_k": 21}) != store.hash


def test_round_trip_is_exact(tmp_path: Path) -> None:
    store = HeadScoreStore(tmp_path, SETTINGS)
    expected = {}
    for i, n_docs in enumerate([5, 1, 7, 0]):
        ids = [f"doc{i}-{j}" for j in range(n_docs)]
        cal, raw = tensors(i, n_docs)
        store.add(f"q{i}", ids, cal, raw)
        expected[f"q{i}"] = (ids, cal, raw)
    assert store.flush() is not None
    loaded = HeadScoreStore(tmp_path, SETTINGS).load()
    assert set(loaded) == set(expected)
    for qid, (ids, cal, raw) in expected.items():
        entry = loaded[qid]
        assert isinstance(entry, Entry)
        assert entry.doc_ids == ids
        assert entry.calibrated.dtype == np.float32 and entry.raw.dtype == np.float32
        np.testing.assert_array_equal(entry.calibrated, cal)
        np.testing.assert_array_equal(entry.raw, raw)
    # no pickled objects anywhere: every array loads with allow_pickle=False and none has dtype object
    for shard in store.path.glob("shard-*.npz"):
        with np.load(shard, allow_pickle=False) as z:
            assert all(z[k].dtype != object for k in z.files)


def test_float64_input_is_stored_as_float32(tmp_path: Path) -> None:
    store = HeadScoreStore(tmp_path, SETTINGS)
    cal = np.arange(6, dtype=np.float64).reshape(1, 2, 3)
    store.add("q", ["a", "b", "c"], cal, cal * 2)
    store.flush()
    entry = HeadScoreStore(tmp_path, SETTINGS).load()["q"]
    assert entry.calibrated.dtype == np.float32
    np.testing.assert_array_equal(entry.raw, (cal * 2).astype(np.float32))


def test_resume_and_auto_flush(tmp_path: Path) -> None:
    store = HeadScoreStore(tmp_path, SETTINGS, auto_flush_every=2)
    for i in range(3):
        store.add(f"q{i}", ["a", "b"], *tensors(i, 2))
    assert len(list(store.path.glob("shard-*.npz"))) == 1  # q0, q1 flushed automatically
    assert store.done() == {"q0", "q1", "q2"}  # q2 is buffered
    # a crash now loses only the buffer; a new process sees what was flushed
    reopened = HeadScoreStore(tmp_path, SETTINGS)
    assert reopened.done() == {"q0", "q1"}
    with pytest.raises(RouteheadError, match="already in the store"):
        reopened.add("q1", ["a", "b"], *tensors(9, 2))
    reopened.add("q2", ["a", "b"], *tensors(2, 2))
    reopened.flush()
    assert reopened.flush() is None  # nothing buffered
    assert HeadScoreStore(tmp_path, SETTINGS).done() == {"q0", "q1", "q2"}
    names = sorted(p.name for p in reopened.path.iterdir())
    assert names == ["meta.json", "shard-00000.npz", "shard-00001.npz"]  # no temp files left behind


def test_context_manager_flushes(tmp_path: Path) -> None:
    with HeadScoreStore(tmp_path, SETTINGS) as store:
        store.add("q", ["a"], *tensors(0, 1))
    assert HeadScoreStore(tmp_path, SETTINGS).done() == {"q"}
    assert len(HeadScoreStore(tmp_path, SETTINGS)) == 1


def test_settings_mismatch_is_refused(tmp_path: Path) -> None:
    store = HeadScoreStore(tmp_path, SETTINGS)
    meta_file = store.path / "meta.json"
    meta = json.loads(meta_file.read_text())
    meta["settings"]["top_k"] = 50
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(RouteheadError, match="stored settings differ"):
        HeadScoreStore(tmp_path, SETTINGS)


def test_corrupt_shard_names_the_file(tmp_path: Path) -> None:
    store = HeadScoreStore(tmp_path, SETTINGS)
    store.add("q", ["a", "b"], *tensors(0, 2))
    shard = store.flush()
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])  # truncated, as after a disk-full
    with pytest.raises(RouteheadError, match="shard-00000.npz"):
        HeadScoreStore(tmp_path, SETTINGS).load()
    shard.write_bytes(b"not a zip file at all")
    with pytest.raises(RouteheadError, match="shard-00000.npz"):
        HeadScoreStore(tmp_path, SETTINGS).done()
    with zipfile.ZipFile(shard, "w") as z:  # valid zip, wrong content
        z.writestr("qids.npy", b"junk")
    with pytest.raises(RouteheadError, match="shard-00000.npz"):
        HeadScoreStore(tmp_path, SETTINGS).load()


def test_shape_checks(tmp_path: Path) -> None:
    store = HeadScoreStore(tmp_path, SETTINGS)
    store.add("q0", ["a", "b"], *tensors(0, 2, layers=3, heads=4))
    with pytest.raises(RouteheadError, match="differs from the store"):
        store.add("q1", ["a", "b"], *tensors(1, 2, layers=3, heads=5))
    store.flush()
    with pytest.raises(RouteheadError, match="differs from the store"):  # also against flushed shards
        HeadScoreStore(tmp_path, SETTINGS).add("q1", ["a", "b"], *tensors(1, 2, layers=2, heads=4))
    cal, raw = tensors(2, 3)
    with pytest.raises(RouteheadError, match="must have shape"):
        store.add("q2", ["a", "b"], cal, raw)  # 3 docs of scores for 2 ids
    with pytest.raises(RouteheadError, match="differ"):
        store.add("q2", ["a", "b", "c"], cal, raw[:, :2])
    with pytest.raises(RouteheadError, match="duplicate"):
        store.add("q2", ["a", "a", "c"], cal, raw)


def test_bad_settings(tmp_path: Path) -> None:
    with pytest.raises(RouteheadError, match="'split'"):
        HeadScoreStore(tmp_path, {"collection": "x"})
    with pytest.raises(RouteheadError, match="plain JSON"):
        HeadScoreStore(tmp_path, {**SETTINGS, "path": Path("x")})
    with pytest.raises(RouteheadError, match="folder name"):
        HeadScoreStore(tmp_path, {**SETTINGS, "collection": "../escape"})


def test_shard_filter_partitions_stably() -> None:
    qids = [f"q{i}" for i in range(10)]
    parts = [shard_filter(qids, s, 3) for s in range(3)]
    assert parts[0] == ["q0", "q3", "q6", "q9"] and parts[1] == ["q1", "q4", "q7"]
    assert sorted(q for part in parts for q in part) == sorted(qids)
    assert shard_filter(qids, 0, 1) == qids
    with pytest.raises(RouteheadError):
        shard_filter(qids, 3, 3)


def test_collection_scored_in_batches_equals_one_at_a_time(tmp_path: Path) -> None:
    """``routehead score --batch-size``: several prompts per pass store the same S as one query at a time."""
    from routehead.engine.scorer import HeadScorer
    from routehead.offline.collect import score_collection
    from routehead.offline.data import load_collection
    from routehead.testing.tiny import tiny_lm

    coll = load_collection("examples/scifact-mini", "test")
    scorer = HeadScorer(tiny_lm("llama"), max_doc_tokens=40)
    runs = [score_collection(coll, scorer, scorer.settings(), top_k=4, max_queries=5, root=tmp_path / str(b),
                             progress=False, batch_size=b) for b in (1, 3)]
    assert len(runs[0].entries) == 5 and runs[0].entries.keys() == runs[1].entries.keys()
    for qid, one in runs[0].entries.items():
        batched = runs[1].entries[qid]
        assert batched.doc_ids == one.doc_ids
        np.testing.assert_allclose(batched.calibrated, one.calibrated, atol=2e-6, rtol=1e-4)


def test_stored_tokens_aggregate_as_inference(tmp_path: Path) -> None:
    """Offline aggregation from the stored (float16) token scores equals the in-pass aggregation of the same
    head sets (ICR, a static set, one head) on the same prompts, with identical rankings; the per-document
    prompt positions follow the document order."""
    from routehead.engine.aggregate import HeadSet, set_scores, spans_of
    from routehead.engine.order import prompt_order
    from routehead.engine.scorer import HeadScorer
    from routehead.offline.collect import score_collection
    from routehead.offline.data import load_collection
    from routehead.offline.views import head_rows, icr_scores
    from routehead.testing.tiny import tiny_lm

    coll = load_collection("examples/scifact-mini", "test")
    scorer = HeadScorer(tiny_lm("llama"), max_doc_tokens=40)
    static = [(0, 1), (2, 3), (3, 0)]
    for order in ("reverse", "shuffle"):
        sc = score_collection(coll, scorer, scorer.settings(), top_k=5, max_queries=3, root=tmp_path / order,
                              progress=False, doc_order=order)
        for qid, e in sc.entries.items():
            perm = prompt_order(len(e.doc_ids), order, qid)
            S = scorer.score(coll.queries[qid], [coll.prompt_text(e.doc_ids[j]) for j in perm],
                             sets=[HeadSet.of(None), HeadSet.of(static), HeadSet.of(static[:1])])
            want = np.empty((3, len(perm)))
            want[:, perm] = S.sets.double().numpy()
            assert e.tokens is not None and e.tokens.positions.tolist() == np.argsort(perm).tolist()
            spans = spans_of(e.tokens.counts)
            got = [icr_scores(sc, qid), set_scores(head_rows(sc, qid, static), spans),
                   set_scores(head_rows(sc, qid, static[:1]), spans)]
            for g, w in zip(got, want):
                np.testing.assert_allclose(g, w, rtol=2e-3, atol=1e-6)
                assert np.argsort(-g, kind="stable").tolist() == np.argsort(-w, kind="stable").tolist()
            np.testing.assert_allclose(e.calibrated[0, 1], want[2], rtol=1e-4, atol=1e-7)  # one head masked alone


def test_chunked_store_aggregates_as_inference(tmp_path: Path) -> None:
    """A store scored with ``max_chunks_per_doc`` > 1 keeps token rows per chunk (``Tokens.chunks``) and gives, read
    back from disk, each document's best chunk's score (MaxP), as the live chunked pass does, for ICR and a static
    set; it has its own key (never the truncated store's), and training refuses it."""
    from routehead.engine.aggregate import HeadSet
    from routehead.engine.order import prompt_order
    from routehead.engine.scorer import HeadScorer
    from routehead.offline.collect import score_collection
    from routehead.offline.data import load_collection
    from routehead.offline.views import queries_for, selection_scores
    from routehead.selection.base import Selection
    from routehead.testing.tiny import tiny_lm

    coll = load_collection("examples/scifact-mini", "test")
    lm = tiny_lm("llama")
    scorer = HeadScorer(lm, max_doc_tokens=40, max_chunks_per_doc=3)
    assert scorer.settings()["max_chunks_per_doc"] == 3
    assert "max_chunks_per_doc" not in HeadScorer(lm, max_doc_tokens=40).settings()  # old stores keep their keys
    static = [(0, 1), (2, 3), (3, 0)]
    sc = score_collection(coll, scorer, scorer.settings(), top_k=4, max_queries=2, root=tmp_path, progress=False,
                          doc_order="shuffle")
    sc = score_collection(coll, None, scorer.settings(), top_k=4, max_queries=2, root=tmp_path, progress=False,
                          doc_order="shuffle")  # read back from the shards
    chunked = 0
    for qid, e in sc.entries.items():
        perm = prompt_order(len(e.doc_ids), "shuffle", qid)
        S = scorer.score(coll.queries[qid], [coll.prompt_text(e.doc_ids[j]) for j in perm],
                         sets=[HeadSet.of(None), HeadSet.of(static)])
        want = np.empty((2, len(perm)))
        want[:, perm] = S.sets.double().numpy()
        t = e.tokens
        assert t is not None and t.chunks is not None and t.chunks.tolist() == [S.chunks[p] for p in np.argsort(perm)]
        chunked += int((t.chunks > 1).sum())
        got = [selection_scores(sc, qid, Selection(HeadSet.of(None))),
               selection_scores(sc, qid, Selection(HeadSet.of(static)))]
        for g, w in zip(got, want):
            np.testing.assert_allclose(g, w, rtol=2e-3, atol=1e-6)
        np.testing.assert_allclose(e.calibrated[0, 1][perm], S.calibrated[0, 1].numpy(), rtol=1e-6)
    assert chunked > 0  # the test reads chunked documents
    with pytest.raises(RouteheadError, match="max_chunks_per_doc"):
        queries_for(sc, static)


def test_a_store_scored_in_another_order_is_refused(tmp_path):
    """A store folder renamed under another order's key (its passes in shuffled order, its setting reversed) is
    refused on load instead of being read as reversed passes."""
    import shutil

    from routehead.engine.scorer import HeadScorer
    from routehead.errors import RouteheadError
    from routehead.offline.collect import score_collection
    from routehead.offline.data import load_collection
    from routehead.offline.store import HeadScoreStore
    from routehead.testing.tiny import tiny_lm

    scorer = HeadScorer(tiny_lm("llama"), max_doc_tokens=24)
    coll = load_collection("examples/scifact-mini", "test")
    kw = dict(top_k=5, max_queries=2, progress=False, root=tmp_path)
    shuffled = score_collection(coll, scorer, scorer.settings(), doc_order="shuffle", **kw)
    reverse = score_collection(coll, None, scorer.settings(), doc_order="reverse", **kw)  # an empty store
    assert len(shuffled.entries) == 2 and not reverse.entries
    src = HeadScoreStore(tmp_path, shuffled.settings).path
    dst = HeadScoreStore(tmp_path, reverse.settings).path
    for f in src.glob("shard-*"):
        shutil.copy(f, dst / f.name)
    with pytest.raises(RouteheadError, match="another prompt order"):
        score_collection(coll, None, scorer.settings(), doc_order="reverse", **kw)
