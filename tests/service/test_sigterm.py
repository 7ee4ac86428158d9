"""SIGTERM during load: in-flight requests finish with complete answers, readiness drops, the process exits."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]


def test_sigterm_drains_in_flight_work_and_exits() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'src'}"}
    proc = subprocess.Popen([sys.executable, "tests/service/fake_server.py", str(port)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{base}/ready", timeout=2, trust_env=False).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, "the service did not start"
            time.sleep(0.1)
        results: list[object] = []

        def one(k: int) -> None:
            try:
                r = httpx.post(f"{base}/v1/rerank", json={"query": f"cat {k}", "documents": ["a cat", "a dog"]},
                               timeout=30, trust_env=False)
                results.append((r.status_code, r.json()))  # .json() fails on a half-written body
            except httpx.TransportError as exc:
                results.append(type(exc).__name__)

        threads = [threading.Thread(target=one, args=(k,)) for k in range(6)]
        for t in threads:
            t.start()
        admitted = time.monotonic() + 20  # wait until all six are admitted (a loaded machine can be slow)
        while time.monotonic() < admitted:
            text = httpx.get(f"{base}/metrics", timeout=2, trust_env=False).text
            gauge = [ln for ln in text.splitlines() if ln.startswith("routehead_requests_in_flight ")]
            done = len(results)
            if gauge and float(gauge[0].split()[1]) + done >= 6:
                break
            time.sleep(0.02)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(30)
        proc.wait(timeout=20)
        exited = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
    # uvicorn re-raises SIGTERM once it has shut down cleanly, so the exit status says "terminated"
    assert proc.returncode in (0, -signal.SIGTERM), proc.stdout.read() if proc.stdout else ""
    assert exited < 10
    answered = [r for r in results if isinstance(r, tuple)]
    assert len(answered) == 6, results  # every request already in flight got its answer
    assert all(code == 200 and len(body["results"]) == 2 for code, body in answered)
    try:
        httpx.get(f"{base}/health", timeout=1, trust_env=False)
        raise AssertionError("the server still answers after SIGTERM")
    except httpx.TransportError:
        pass
