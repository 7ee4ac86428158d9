"""bench/speed.py on a tiny random model on CPU: the JSON it writes, its ratios and its head rules (seconds).

The script runs as a user runs it (its own process); its passes, head rules and measurements are in
:mod:`routehead.testing`, tested here directly."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SPEED = ROOT / "bench" / "speed.py"


def run_speed(*args: str) -> tuple[dict, dict]:
    """bench/speed.py with ``args`` (which end in ``--out PATH``): the JSON it printed and the one it wrote."""
    done = subprocess.run([sys.executable, str(SPEED), *args], check=True, capture_output=True, text=True,
                          timeout=300)
    return json.loads(done.stdout), json.loads(Path(args[args.index("--out") + 1]).read_text())


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


def test_head_rules():
    from routehead.testing.passes import routed_heads, static16_heads

    s16 = static16_heads(30, 9)
    assert len(s16) == 16 and len(set(s16)) == 16
    assert s16[0] == (0, 0) and s16[-1] == (14, 8) and max(lay for lay, _ in s16) == 14
    assert routed_heads(30, 9) == [(0, 0), (6, 2), (13, 4), (19, 6)]
    assert routed_heads(32, 32) == [(0, 0), (7, 8), (13, 16), (20, 24)]
    s16_8b = static16_heads(32, 32)
    assert len(s16_8b) == 16 and max(lay for lay, _ in s16_8b) == 15
    assert static16_heads(6, 4) == [(lay, h) for lay in range(3) for h in range(4)]  # pool < 16: all


@pytest.fixture(scope="module")
def tiny_scorer():
    from routehead.engine.scorer import HeadScorer
    from routehead.testing.random_models import random_lm

    return HeadScorer(random_lm("tiny", "cpu"), max_doc_tokens=None)


def test_modes_are_registered_methods(tiny_scorer):
    """Each timed selection is the registry's method; a model without a shipped router times the routed-style
    synthetic set; batching changes no score."""
    from routehead.testing.passes import mode_method, rerank_pass, routed_heads, static16_heads
    from routehead.testing.workload import SYNTH_QUERY, sized_docs

    lm = tiny_scorer.lm
    assert mode_method("full", lm).name == "icr" and mode_method("full", lm).select().heads.heads is None
    assert mode_method("static16", lm).select().heads.heads == tuple(static16_heads(6, 4))
    routed = mode_method("routed", lm)
    assert routed.name == "static" and routed.select().heads.heads == tuple(routed_heads(6, 4))
    items = [(SYNTH_QUERY, sized_docs(tiny_scorer, n, 30, seed=n)) for n in (2, 3, 4)]
    for mode in ("full", "static16"):
        method = mode_method(mode, lm)
        alone = rerank_pass(tiny_scorer, items, method, batch_size=1)
        batched = rerank_pass(tiny_scorer, items, method, batch_size=3)
        for a, b in zip(alone, batched):
            assert a.sets.shape == (1, a.num_docs)
            assert float((a.sets - b.sets).abs().max()) <= 1e-5 * float(a.sets.abs().max())


def test_shipped_modes_run_with_their_asset_and_stop_at_its_deepest_layer(tiny_scorer, tmp_path, monkeypatch):
    """static, single, core and layers load the asset shipped for the model (here: files for the tiny model put
    where the shipped ones are looked up), run through rerank_pass and count the layers up to the deepest one read;
    without an asset they are Skipped, which measure() records as "skipped"."""
    from routehead.selection.heads import save_heads
    from routehead.selection.layers import save_window
    from routehead.testing.measure import measure
    from routehead.testing.passes import SHIPPED_MODES, Skipped, layers_run, mode_method
    from routehead.testing.workload import SYNTH_QUERY, sized_docs

    lm, docs = tiny_scorer.lm, sized_docs(tiny_scorer, 2, 30, seed=0)
    for mode in SHIPPED_MODES:  # random:tiny has no shipped asset
        with pytest.raises(Skipped):
            mode_method(mode, lm)
        r = measure(mode, tiny_scorer, SYNTH_QUERY, docs, 0, 1, None, 0)
        assert r["status"] == "skipped" and "skipped: no " in r["note"], r
    ident = lm.identity()
    save_heads(tmp_path / "qr.json", [(2, 1), (0, 3), (1, 0)], ident)
    save_heads(tmp_path / "core.json", [(1, 2), (3, 0)], ident)
    save_window(tmp_path / "win.json", (1, 2), ident)
    monkeypatch.setattr("routehead.selection.static.default_heads_path", lambda _: tmp_path / "qr.json")
    monkeypatch.setattr("routehead.selection.core.default_core_heads_path", lambda _: tmp_path / "core.json")
    monkeypatch.setattr("routehead.selection.layers.default_window_path", lambda _: tmp_path / "win.json")
    want = {"static": (3, 3), "single": (1, 3), "core": (2, 4), "layers": (8, 3)}  # (heads, layers run)
    for mode, (n_heads, depth) in want.items():
        method = mode_method(mode, lm)
        assert method.name == mode and len(method.select().heads.heads) == n_heads
        assert layers_run(mode, tiny_scorer, SYNTH_QUERY) == depth
        r = measure(mode, tiny_scorer, SYNTH_QUERY, docs, 0, 1, None, 0)
        assert r["status"] == "ok" and _positive(r["median_s"]), r
    assert layers_run("full", tiny_scorer, SYNTH_QUERY) == layers_run("bare", tiny_scorer, SYNTH_QUERY) == 6
    assert layers_run("static16", tiny_scorer, SYNTH_QUERY) == 3


def test_quick_json_on_tiny_random_model(tmp_path):
    out = tmp_path / "speed.json"
    printed, stored = run_speed("--model", "random:tiny", "--device", "cpu", "--tokens", "384", "--docs", "4",
                                "--repeats", "1", "--warmup", "1", "--no-isolate", "--json", "--out", str(out),
                                "--throughput", "--candidates", "2", "4", "--queries", "1", "--doc-tokens", "40",
                                "--default-malloc")
    for d in (printed, stored):
        for key in ("bare_s", "full_s", "static16_s", "routed_s", "eager_s", "full_over_bare", "routed_over_full",
                    "static16_over_bare", "eager_over_bare", "peak_mem_over_bare", "prompt_tokens", "machine",
                    "runs", "throughput"):
            assert key in d, key
        for key in ("cpu", "torch", "transformers", "torch_threads", "date"):
            assert d["machine"][key], key
    assert printed["prompt_tokens"] == stored["prompt_tokens"]
    assert abs(stored["prompt_tokens"] - 384) <= 16  # documents sized from an estimate of the fixed tokens
    for key in ("bare_s", "full_s", "full_per_head_s", "static16_s", "routed_s", "eager_s", "full_over_bare",
                "full_per_head_over_bare", "routed_over_full", "static16_over_bare", "eager_over_bare",
                "routed_over_bare"):
        assert _positive(stored[key]), (key, stored[key])
    assert stored["peak_mem_over_bare"] is None or _positive(stored["peak_mem_over_bare"])
    assert all(v >= 0 for v in stored["peak_mem_mb"].values())
    assert stored["heads"]["routed"] == {"source": "synthetic", "heads": [[0, 0], [1, 1], [2, 2], [3, 3]]}
    # depth: every layer for the all-head passes, the deepest read + 1 for a head set (tiny: 6 layers)
    assert stored["num_layers"] == 6
    assert stored["layers_run"] == {"bare": 6, "full": 6, "full_per_head": 6, "static16": 3, "static": None,
                                    "single": None, "core": None, "layers": None, "routed": 4, "eager": 6}
    # a random model has no shipped asset: those modes are skipped with the reason, not run, no ratio
    for m in ("static", "single", "core", "layers"):
        assert stored[f"{m}_s"] == "skipped" and stored["notes"][m].startswith("skipped: no "), m
        assert stored["over_full_by_method"][m] is None and stored["heads"][m] is None
    assert stored["over_full_by_method"]["full"] == 1.0 and stored["over_bare_by_method"]["bare"] == 1.0
    assert stored["over_full_by_method"]["routed"] == stored["routed_over_full"]
    assert _positive(stored["over_bare_by_method"]["static16"])
    for c in ("2", "4"):
        for m in ("full", "routed"):
            assert _positive(stored["throughput"][c][m]["qps"])


def test_eager_guard_records_oom(tmp_path):
    out = tmp_path / "guard.json"
    r, _ = run_speed("--model", "random:tiny", "--device", "cpu", "--tokens", "256", "--docs", "2",
                     "--methods", "bare", "eager", "--repeats", "1", "--warmup", "0", "--no-isolate",
                     "--eager-max-gb", "0.000001", "--json", "--out", str(out), "--default-malloc")
    assert r["eager_s"] == "OOM" and r["eager_over_bare"] == "OOM"
    assert "predicted" in r["notes"]["eager"]
    assert _positive(r["bare_s"])


def test_memory_phase_with_fixed_malloc(tmp_path):
    """CPU default: times under glibc's defaults, then a memory-only phase with fixed mmap thresholds."""
    out = tmp_path / "mem.json"
    _, r = run_speed("--model", "random:tiny", "--device", "cpu", "--tokens", "256", "--docs", "2",
                     "--methods", "bare", "full", "--repeats", "1", "--warmup", "0", "--no-isolate",
                     "--threads", "1", "--json", "--out", str(out))
    assert r["config"]["malloc"] == "fixed"
    assert set(r["peak_mem_mb_default_malloc"]) == {"bare", "full"} and set(r["peak_mem_mb"]) == {"bare", "full"}
    assert len(r["times_s"]["full"]) == 1  # the memory phase adds no times
    assert _positive(r["peak_mem_over_bare"]) or r["peak_mem_over_bare"] is None


def test_isolated_child_measures_one_mode(tmp_path):
    """--isolate: each mode in a spawned child, which imports its work from the package (not from the script)."""
    out = tmp_path / "iso.json"
    _, r = run_speed("--model", "random:tiny", "--device", "cpu", "--tokens", "256", "--docs", "2",
                     "--methods", "bare", "routed", "--repeats", "1", "--warmup", "0", "--isolate",
                     "--threads", "1", "--default-malloc", "--json", "--out", str(out))
    assert _positive(r["bare_s"]) and _positive(r["routed_s"]), r.get("notes")


def test_method_scores_are_what_method_run_ranks(tmp_path, monkeypatch):
    """The per-query scores bench analyses read (calibration, position bias, the two-order average) are the ones
    the evaluation run of the same registered method ranks."""
    import numpy as np

    from routehead.engine.scorer import HeadScorer
    from routehead.evaluation.runs import method_run
    from routehead.evaluation.scores import method_scores
    from routehead.metrics import rank_order
    from routehead.offline.collect import score_collection
    from routehead.offline.data import load_collection
    from routehead.selection import load_method
    from routehead.selection.router import Router, RouterConfig
    from routehead.testing.tiny import tiny_lm

    monkeypatch.setenv("ROUTEHEAD_STORE", str(tmp_path / "store"))
    lm = tiny_lm("llama")
    coll = load_collection(ROOT / "examples" / "scifact-mini", "test")
    scorer = HeadScorer(lm, max_doc_tokens=40)
    sc = score_collection(coll, scorer, scorer.settings(), top_k=5, max_queries=3, progress=False)
    cfg = RouterConfig(identity=lm.identity(), embed_layer=1, pool=[[0, 1], [2, 3], [3, 0]], dim=8, threshold=0.3,
                       max_heads=2, weighting="prob")
    Router(cfg, prior=np.array([0.6, 0.4, 0.5])).save(tmp_path / "router.safetensors")
    for name, kw in (("icr", {}), ("static", {"heads": [(0, 1), (2, 3)]}), ("single", {"heads": [(3, 0)]}),
                     ("route", {"router": tmp_path / "router.safetensors"})):
        method = load_method(name, lm.identity(), **kw)
        chosen: dict = {}
        scores = method_scores(sc, method, scorer, selections=chosen)
        assert sorted(scores) == sorted(sc.entries) == sorted(chosen)
        run = method_run(sc, method, scorer)
        for qid, s in scores.items():
            top = sc.entries[qid].doc_ids
            assert list(run[qid])[:len(top)] == [top[i] for i in rank_order(s)], (name, qid)
        assert method_scores(sc, method, scorer, qids=sorted(sc.entries)[:1]).keys() == {sorted(sc.entries)[0]}
