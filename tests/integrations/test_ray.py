"""Ray scale-out on a local 2-CPU Ray: rerank_dataset, the TREC writer, and `routehead score --ray`, whose store
must equal a single-process run's, also after an actor dies mid-run and the command is rerun."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("ray")
pytest.importorskip("ray.data")

from routehead.cli import main  # noqa: E402
from tests.integrations.adapters_common import DOCS, FIRST_STAGE, QUERY, tiny_folder  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def ray_local():
    """One local Ray for the module (its start-up is most of these tests' time); workers import tests/."""
    import ray
    import ray.data

    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "src")] + ([old] if old else []))
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()
    if old is None:
        os.environ.pop("PYTHONPATH", None)
    else:
        os.environ["PYTHONPATH"] = old


class TinyModel:
    """A picklable zero-argument factory: the tiny model from a saved folder, built inside each actor; each
    call appends the actor's pid to ``log`` (to count model loads)."""

    def __init__(self, folder: Path, log: Path | None = None) -> None:
        self.folder, self.log = str(folder), log

    def __call__(self):
        from routehead.engine.model import load_model

        if self.log is not None:
            with open(self.log, "a") as fh:
                fh.write(f"{os.getpid()}\n")
        return load_model(self.folder, device="cpu")


class KillOneActor:
    """An ``actor_setup``: the first actor to reach ``after`` forward passes claims ``marker`` and is killed
    with SIGKILL (no flush, no cleanup), as a crashed or preempted worker would be."""

    def __init__(self, marker: Path, after: int) -> None:
        self.marker, self.after = str(marker), after

    def __call__(self) -> None:
        import torch

        calls = {"n": 0}

        def hook(module, args):
            if isinstance(module, torch.nn.Embedding):  # once per forward pass of a decoder
                calls["n"] += 1
                if calls["n"] == self.after:
                    try:
                        os.unlink(self.marker)  # only one actor wins the marker
                    except FileNotFoundError:
                        return
                    os.kill(os.getpid(), signal.SIGKILL)

        torch.nn.modules.module.register_module_forward_pre_hook(hook)


def test_rerank_dataset_matches_the_reranker_and_writes_a_trec_run(ray_local, tmp_path):
    from routehead.api import Reranker
    from routehead.integrations.ray import rerank_dataset, write_trec_run
    from routehead.offline.trec import read_run

    folder = tiny_folder(tmp_path / "tiny-llama")
    rows = [{"query_id": f"q{i}", "query": f"{QUERY} {i}", "doc_ids": [f"d{j}" for j in range(len(DOCS))],
             "docs": DOCS[i % 2:], "first_stage_scores": FIRST_STAGE[i % 2:]} for i in range(5)]
    for r in rows:
        r["doc_ids"] = r["doc_ids"][:len(r["docs"])]
    ds = ray_local.data.from_items(rows)
    log = tmp_path / "loads"
    out = rerank_dataset(ds, model=TinyModel(folder, log=log), method="static", heads=[(0, 1), (3, 2)],
                         concurrency=1, batch_size=2).take_all()
    assert len(log.read_text().split()) == 1  # three batches, one model load (concurrency=1: one actor)
    rr = Reranker(model=str(folder), method="static", heads=[(0, 1), (3, 2)], device="cpu")
    assert sorted(r["query_id"] for r in out) == [f"q{i}" for i in range(5)]
    for row in out:
        src = rows[int(row["query_id"][1:])]
        want = rr.rerank(src["query"], src["docs"], first_stage_scores=src["first_stage_scores"])
        assert list(row["ranked_doc_ids"]) == [src["doc_ids"][i] for i in want.indices]
        assert np.allclose(row["scores"], want.scores, atol=1e-6)
        assert [list(h) for h in row["heads"]] == [[0, 1], [3, 2]] and list(row["docs"]) == src["docs"]
    assert write_trec_run(out, tmp_path / "run.trec", "routehead-static") == 5
    run = read_run(tmp_path / "run.trec")
    best = {r["query_id"]: r["ranked_doc_ids"][0] for r in out}
    assert {q: max(d, key=d.get) for q, d in run.items()} == best


def _collection(folder: Path, n_queries: int) -> Path:
    """A small BEIR folder with enough queries for a shard to flush (the store flushes every 25 adds)."""
    folder.mkdir()
    words = ["starch", "enzyme", "sugar", "fat", "protein", "cell", "heart", "blood", "brain", "liver"]
    with open(folder / "corpus.jsonl", "w") as fh:
        for j in range(24):
            text = " ".join(words[(j + k) % len(words)] for k in range(4))
            fh.write(json.dumps({"_id": f"d{j}", "title": "", "text": f"Document {j} about {text}."}) + "\n")
    with open(folder / "queries.jsonl", "w") as fh:
        for i in range(n_queries):
            fh.write(json.dumps({"_id": f"q{i}", "text": f"{words[i % 10]} and {words[(3 * i + 1) % 10]}?"}) + "\n")
    (folder / "qrels").mkdir()
    with open(folder / "qrels" / "test.tsv", "w") as fh:
        fh.write("query-id\tcorpus-id\tscore\n")
        for i in range(n_queries):
            fh.write(f"q{i}\td{i % 24}\t1\n")
    return folder


def _stored(options: dict):
    """Entries of the store ``routehead score`` with these options fills, and each shard file's query ids."""
    from routehead.integrations.ray import score_job
    from routehead.offline.collect import store_root
    from routehead.offline.store import HeadScoreStore

    sc, _ = score_job(**options).run(compute=False)
    path = HeadScoreStore(store_root(), sc.settings).path
    per_shard = [np.load(p)["qids"].tolist() for p in sorted(path.glob("shard-*.npz"))]
    return sc.entries, per_shard


def _differences(a, b, where: str = "entry") -> list[str]:
    """Where two stored entries differ, field by field (whatever fields the store format has); [] if nowhere."""
    if dataclasses.is_dataclass(a):
        if type(a) is not type(b):
            return [f"{where}: {type(a).__name__} vs {type(b).__name__}"]
        return [d for f in dataclasses.fields(a)
                for d in _differences(getattr(a, f.name), getattr(b, f.name), f"{where}.{f.name}")]
    if isinstance(a, np.ndarray):
        if not isinstance(b, np.ndarray) or a.dtype != b.dtype or a.shape != b.shape:
            return [f"{where}: {getattr(a, 'shape', None)} {a.dtype} vs {getattr(b, 'shape', None)}"]
        if not np.array_equal(a, b):
            return [f"{where}: max |diff| {np.abs(a.astype(np.float64) - b.astype(np.float64)).max():.3g}"]
        return []
    return [] if a == b else [f"{where}: {a!r} vs {b!r}"]


def test_score_ray_equals_single_process_even_after_an_actor_dies(ray_local, tmp_path, monkeypatch, capsys):
    import torch

    from routehead.errors import RouteheadError
    from routehead.integrations.ray import score_collection_ray

    folder = tiny_folder(tmp_path / "tiny-llama")
    data = _collection(tmp_path / "coll", 64)
    options = dict(data=str(data), split="test", top_k=3, model=str(folder), device="cpu", no_progress=True)
    common = ["--data", str(data), "--split", "test", "--top-k", "3", "--model", str(folder), "--device", "cpu",
              "--no-progress"]
    monkeypatch.setenv("ROUTEHEAD_STORE", str(tmp_path / "single"))
    # the actors below get 1 CPU each, so 1 torch thread; a matrix product's float32 rounding depends on how its
    # sums are split across threads (about 1e-9 here), so the reference uses 1 thread too and must match exactly
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["score", *common]) == 0
    finally:
        torch.set_num_threads(threads)
    single, _ = _stored(options)

    # run 1: two actors, one killed after 30 queries (25 of them flushed, the rest lost with it)
    monkeypatch.setenv("ROUTEHEAD_STORE", str(tmp_path / "ray"))
    marker = tmp_path / "kill"
    marker.touch()
    with pytest.raises(RouteheadError, match=r"shard\(s\) [01]/2 failed.*rerun"):
        score_collection_ray(actors=2, actor_setup=KillOneActor(marker, after=30), **options)
    assert not marker.exists()
    partial, shards = _stored(options)
    assert 25 <= len(partial) < 64 and shards  # the dead actor's flushed queries survived

    # run 2: the same command through the CLI scores only what is missing
    capsys.readouterr()
    assert main(["score", "--ray", "2", *common]) == 0
    assert capsys.readouterr().out.startswith("64 queries stored for coll/test (2 Ray actors, ")
    got, shards = _stored(options)
    flat = [q for s in shards for q in s]
    assert len(flat) == len(set(flat)) == 64  # nothing stored twice
    assert set(got) == set(single) == {f"q{i}" for i in range(64)}
    for q, e in single.items():
        assert not _differences(got[q], e), (q, _differences(got[q], e))
    for q in partial:
        assert not _differences(got[q], partial[q])  # kept as stored before the kill, not recomputed


@pytest.mark.slow
def test_readme_ray_snippet_runs_on_the_default_model(ray_local, tmp_path, monkeypatch, capsys):
    import runpy

    from tests.integrations.test_readme_integrations import shipped_router_problem

    if shipped_router_problem():  # the actors load the shipped router themselves; nothing to stand in for it
        pytest.skip(f"the router shipped for the default model cannot be loaded: {shipped_router_problem()}")

    monkeypatch.chdir(tmp_path)
    runpy.run_path(str(ROOT / "examples" / "integrations" / "ray_rerank.py"), run_name="__main__")
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and out[0].endswith("]") and "'d1']" in out[0]  # the distractor (Jupiter) last
    first = out[0].split("'")[1]
    assert first in ("d2", "d3") and (tmp_path / "routehead.trec").read_text().startswith(f"q1 Q0 {first} 1 ")
