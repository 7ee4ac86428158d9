"""The fused span kernels (routehead.engine.span_kernel) against the torch path and eager attention.

They run on GPUs; here they run under Triton's CPU interpreter, in a child process (tests/engine/span_kernel_cases.py),
since the interpreter must be switched on before Triton compiles anything.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from routehead.engine import capture, span_kernel

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def cases() -> dict[str, float]:
    if span_kernel.triton is None:
        pytest.skip("Triton is not installed")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)])}
    done = subprocess.run([sys.executable, "-m", "tests.engine.span_kernel_cases"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


@pytest.mark.parametrize("case", ["window=None", "window=48", "llama rows vs eager", "gemma3 rows vs eager",
                                  "llama batched tokens vs torch", "gemma3 batched tokens vs torch"])
def test_fused_equals_reference(cases, case):
    assert cases[case] < 1e-6, f"{case}: max abs difference {cases[case]:.3g}"


def test_models_ran_the_kernels(cases):
    # both branches, every layer (tiny Llama 4, Gemma-3 6), two passes each (query_rows, score_many)
    assert cases["kernel calls"] == 2 * (4 + 6) * 2


def test_kernel_setting():
    x = torch.zeros(1, 1, 4, 8)
    with capture.kernel("torch"):
        assert not capture.fused(x, 4, None)
    assert not capture.fused(x, 4, None)  # auto on a CPU tensor: the torch path
    with capture.kernel("triton"):
        assert not capture.fused(x, 4, 30.0)  # softcap: the torch path
    with pytest.raises(ValueError, match="unknown kernel"):
        capture.kernel("cuda")


def test_a_failing_kernel_falls_back_to_torch_ops(monkeypatch):
    """If Triton fails on a user's machine, scoring warns once and goes on with the torch ops (same scores);
    asked for explicitly (``triton``), the error is raised."""
    monkeypatch.setattr(capture, "FUSED_ERROR", [])

    def broken():
        raise RuntimeError("no kernel image for this GPU")

    with pytest.warns(RuntimeWarning, match="fused span kernels failed"):
        assert capture._guarded(broken) is None
    assert capture.FUSED_ERROR and not capture.fused(torch.zeros(1, 1, 4, 8), 4, None)
    with capture.kernel("triton"), pytest.raises(RuntimeError, match="no kernel image"):
        capture._guarded(broken)
