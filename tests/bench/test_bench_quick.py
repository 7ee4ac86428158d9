"""bench/speed.py on a tiny random model on CPU: the JSON it writes, its ratios and its head rules (seconds)."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def speed():
    spec = importlib.util.spec_from_file_location("bench_speed", ROOT / "bench" / "speed.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


def test_head_rules(speed):
    s16 = speed.static16_heads(30, 9)
    assert len(s16) == 16 and len(set(s16)) == 16
    assert s16[0] == (0, 0) and s16[-1] == (14, 8) and max(lay for lay, _ in s16) == 14
    assert speed.routed_heads(30, 9) == [(0, 0), (6, 2), (13, 4), (19, 6)]
    assert speed.routed_heads(32, 32) == [(0, 0), (7, 8), (13, 16), (20, 24)]
    s16_8b = speed.static16_heads(32, 32)
    assert len(s16_8b) == 16 and max(lay for lay, _ in s16_8b) == 15
    assert speed.static16_heads(6, 4) == [(lay, h) for lay in range(3) for h in range(4)]  # pool < 16: all


def test_quick_json_on_tiny_random_model(speed, tmp_path, capsys):
    out = tmp_path / "speed.json"
    result = speed.main(["--model", "random:tiny", "--device", "cpu", "--tokens", "384", "--docs", "4",
                         "--repeats", "1", "--warmup", "1", "--no-isolate", "--json", "--out", str(out),
                         "--throughput", "--candidates", "2", "4", "--queries", "1", "--doc-tokens", "40",
                         "--default-malloc"])  # in-process: leave this test process's allocator as it is
    printed = json.loads(capsys.readouterr().out)
    stored = json.loads(out.read_text())
    for d in (printed, stored):
        for key in ("bare_s", "full_s", "static16_s", "routed_s", "eager_s", "full_over_bare", "routed_over_full",
                    "static16_over_bare", "eager_over_bare", "peak_mem_over_bare", "prompt_tokens", "machine",
                    "runs", "throughput"):
            assert key in d, key
        for key in ("cpu", "torch", "transformers", "torch_threads", "date"):
            assert d["machine"][key], key
    assert result["prompt_tokens"] == stored["prompt_tokens"]
    assert abs(stored["prompt_tokens"] - 384) <= 16  # documents sized from an estimate of the fixed tokens
    for key in ("bare_s", "full_s", "full_per_head_s", "static16_s", "routed_s", "eager_s", "full_over_bare",
                "full_per_head_over_bare", "routed_over_full", "static16_over_bare", "eager_over_bare",
                "routed_over_bare"):
        assert _positive(stored[key]), (key, stored[key])
    assert stored["peak_mem_over_bare"] is None or _positive(stored["peak_mem_over_bare"])
    assert all(v >= 0 for v in stored["peak_mem_mb"].values())
    assert stored["heads"]["routed"] == {"source": "synthetic", "heads": [[0, 0], [1, 1], [2, 2], [3, 3]]}
    for c in ("2", "4"):
        for m in ("full", "routed"):
            assert _positive(stored["throughput"][c][m]["qps"])


def test_eager_guard_records_oom(speed, tmp_path, capsys):
    out = tmp_path / "guard.json"
    r = speed.main(["--model", "random:tiny", "--device", "cpu", "--tokens", "256", "--docs", "2",
                    "--methods", "bare", "eager", "--repeats", "1", "--warmup", "0", "--no-isolate",
                    "--eager-max-gb", "0.000001", "--json", "--out", str(out), "--default-malloc"])
    capsys.readouterr()
    assert r["eager_s"] == "OOM" and r["eager_over_bare"] == "OOM"
    assert "predicted" in r["notes"]["eager"]
    assert _positive(r["bare_s"])


def test_memory_phase_with_fixed_malloc(tmp_path):
    """CPU default: times under glibc's defaults, then a memory-only phase with fixed mmap thresholds (own process)."""
    import subprocess
    import sys

    out = tmp_path / "mem.json"
    subprocess.run([sys.executable, str(ROOT / "bench" / "speed.py"), "--model", "random:tiny", "--device", "cpu",
                    "--tokens", "256", "--docs", "2", "--methods", "bare", "full", "--repeats", "1", "--warmup", "0",
                    "--no-isolate", "--threads", "1", "--json", "--out", str(out)],
                   check=True, capture_output=True, timeout=300)
    r = json.loads(out.read_text())
    assert r["config"]["malloc"] == "fixed"
    assert set(r["peak_mem_mb_default_malloc"]) == {"bare", "full"} and set(r["peak_mem_mb"]) == {"bare", "full"}
    assert len(r["times_s"]["full"]) == 1  # the memory phase adds no times
    assert _positive(r["peak_mem_over_bare"]) or r["peak_mem_over_bare"] is None
