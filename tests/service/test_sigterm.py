"""SIGTERM during load, on the real process (``fake_server.py``): readiness drops, every in-flight and queued request
is answered (its ranking, or a JSON 503 with Retry-After where the grace is too short), the log has no traceback,
and the process exits within the grace.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[2]
DOCS = ["a cat", "a dog"]


def _in_flight(base: str) -> float:
    text = httpx.get(f"{base}/metrics", timeout=2, trust_env=False).text
    gauge = [ln for ln in text.splitlines() if ln.startswith("routehead_requests_in_flight ")]
    return float(gauge[0].split()[1]) if gauge else 0.0


def _sigterm_under_load(n: int, *server_args: str, measure_first: bool = False) -> dict[str, Any]:
    """Start the fake server, send ``n`` concurrent requests, SIGTERM it once all are admitted; what came back."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'src'}"}
    proc = subprocess.Popen([sys.executable, "tests/service/fake_server.py", str(port), *server_args], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    results: list[object] = []
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
        if measure_first:  # one answered request: the queue then knows its tokens/s
            assert httpx.post(f"{base}/v1/rerank", json={"query": "cat", "documents": DOCS}, timeout=30,
                              trust_env=False).status_code == 200

        def one(k: int) -> None:
            try:
                r = httpx.post(f"{base}/v1/rerank", json={"query": f"cat {k}", "documents": DOCS}, timeout=30,
                               trust_env=False)
                results.append((r.status_code, r.json(), r.headers))  # .json() fails on a half-written body
            except httpx.TransportError as exc:
                results.append(type(exc).__name__)

        threads = [threading.Thread(target=one, args=(k,)) for k in range(n)]
        for t in threads:
            t.start()
        admitted = time.monotonic() + 20  # wait until all are admitted (a loaded machine can be slow)
        while time.monotonic() < admitted and _in_flight(base) + len(results) < n:
            time.sleep(0.02)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(30)
        proc.wait(timeout=30)
        exited = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
    log = proc.stdout.read() if proc.stdout else ""
    try:
        httpx.get(f"{base}/health", timeout=1, trust_env=False)
        still_up = True
    except httpx.TransportError:
        still_up = False
    return {"returncode": proc.returncode, "exited": exited, "results": results, "log": log, "still_up": still_up}


def _check_clean_exit(out: dict[str, Any], grace: float) -> None:
    # uvicorn re-raises SIGTERM once it has shut down cleanly, so the exit status says "terminated"
    assert out["returncode"] in (0, -signal.SIGTERM), out["log"]
    assert out["exited"] < grace + 1.0, (out["exited"], out["log"])  # within the grace (+ process teardown)
    assert "Traceback" not in out["log"] and "Cancel" not in out["log"], out["log"]
    assert not out["still_up"], "the server still answers after SIGTERM"


def test_sigterm_drains_in_flight_work_and_exits() -> None:
    out = _sigterm_under_load(6, "0.4", "5", "2")  # 6 x 0.4 s in pairs: well within the 5 s grace
    _check_clean_exit(out, 5)
    answered = [r for r in out["results"] if isinstance(r, tuple)]
    assert len(answered) == 6, out["results"]  # every request already in flight got its answer
    assert all(code == 200 and len(body["results"]) == 2 for code, body, _ in answered)


def test_sigterm_answers_what_the_grace_cannot_hold_with_503() -> None:
    """8 requests of 1 s each, one at a time, and a 3 s grace: the first ones finish, every other one gets a JSON
    503 with Retry-After before the grace ends (never uvicorn's plain-text 500), and the process exits in time."""
    out = _sigterm_under_load(8, "1.0", "3", "1", measure_first=True)
    _check_clean_exit(out, 3)
    answered = [r for r in out["results"] if isinstance(r, tuple)]
    assert len(answered) == 8, out["results"]
    codes = sorted(code for code, _, _ in answered)
    assert codes.count(200) >= 1 and codes.count(503) >= 1 and set(codes) == {200, 503}, codes
    for code, body, headers in answered:
        if code == 503:
            assert body["error"]["type"] == "not_ready" and "shutting down" in body["error"]["message"]
            assert int(headers["retry-after"]) >= 1


def test_a_handler_the_server_cancels_still_answers_json_503() -> None:
    """A request stuck outside the queue (here: in the token count) when the grace ends: uvicorn cancels its
    handler, which answers a JSON 503 with Retry-After instead of uvicorn's plain-text 500 (in-process server)."""
    from routehead.service import ServiceSettings, create_app
    from routehead.service.run import build_server
    from tests.service.conftest import BatchFake

    class StuckCount(BatchFake):
        def prompt_tokens(self, query: str, documents: Any) -> int:
            if "stuck" in query:
                time.sleep(1.5)
            return super().prompt_tokens(query, documents)

    settings = ServiceSettings(graceful_shutdown_s=0.5)
    server = build_server(create_app(StuckCount(), settings=settings), "127.0.0.1", 0, settings, log_level="critical")
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    got: list[httpx.Response] = []
    client = threading.Thread(target=lambda: got.append(httpx.post(
        f"http://127.0.0.1:{port}/v1/rerank", json={"query": "stuck", "documents": DOCS}, timeout=10,
        trust_env=False)))
    client.start()
    time.sleep(0.3)
    server.should_exit = True
    client.join(10)
    thread.join(10)
    assert got and got[0].status_code == 503, got
    assert got[0].json()["error"]["type"] == "not_ready" and got[0].headers["retry-after"] == "1"
