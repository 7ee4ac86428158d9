"""A running pass nobody waits for any more (504, client gone, answered 503 by the SIGTERM drain) stops at the next
layer boundary and frees the worker.

The model is a tiny random Llama made 12 layers deep whose layers sleep ``LAYER_S`` each while ``SlowLayers.on``
is set (a forward pre-hook, registered before the reranker's own check, so a layer's time comes before its
boundary): a whole pass then takes 12 x ``LAYER_S``, and a worker freed "within one layer" is told apart from one
that finishes the pass.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
import time
from collections.abc import Iterator

import httpx
import numpy as np
import pytest
import torch

from routehead.api import Reranker
from routehead.engine.model import wrap_model
from routehead.service import ServiceSettings, create_app
from routehead.service.batching import Batcher, Work
from routehead.service.metrics import Metrics
from routehead.service.protocol import takes_should_stop
from routehead.service.run import build_server
from routehead.testing import byte_tokenizer
from routehead.testing.tiny import tiny_config
from tests.service.conftest import TEST_LIMITS, BatchFake, live_server

LAYERS, LAYER_S = 12, 0.2
SLACK = 0.4  # scheduling on a busy 2-core box; still far below the rest of a pass (over 1.5 s here)
DOCS = ["Amylase digests starch.", "Paris is in France.", "Lipase digests fat."]


class SlowLayers:
    """Sleeps ``LAYER_S`` before each decoder layer while ``on`` is set; records when each pass enters layer 0."""

    def __init__(self, layers: torch.nn.ModuleList) -> None:
        self.on = threading.Event()
        self.passes: list[float] = []  # perf_counter() at each pass's first layer
        self.layer_calls = 0
        for i, layer in enumerate(layers):
            layer.register_forward_pre_hook(lambda _m, _a, i=i: self._enter(i))

    def _enter(self, i: int) -> None:
        if i == 0:
            self.passes.append(time.perf_counter())
        self.layer_calls += 1
        if self.on.is_set():
            time.sleep(LAYER_S)


@pytest.fixture(scope="module")
def slow_rr() -> tuple[Reranker, SlowLayers]:
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    cfg = LlamaConfig(**{**tiny_config("llama").to_dict(), "num_hidden_layers": LAYERS})
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa", dtype=torch.float32)
    rr = Reranker(model=wrap_model(model, byte_tokenizer(True), name="tiny-deep-llama"), method="icr")
    assert rr.lm.num_layers == LAYERS
    return rr, SlowLayers(rr.scorer.layers)


@pytest.fixture()
def slow(slow_rr: tuple[Reranker, SlowLayers]) -> Iterator[SlowLayers]:
    layers = slow_rr[1]
    layers.passes.clear()
    yield layers
    layers.on.clear()


def work(query: str) -> Work:
    return Work(query=query, documents=list(DOCS), tokens=100)


def _stop_lines(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.getMessage().startswith("stopped a model call")]


def test_only_rerankers_that_name_should_stop_get_it(slow_rr: tuple[Reranker, SlowLayers]) -> None:
    assert takes_should_stop(slow_rr[0])
    assert not takes_should_stop(BatchFake())  # served as before: its calls run to the end


def test_a_timed_out_request_frees_the_worker_within_a_layer(slow_rr, slow: SlowLayers,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    rr = slow_rr[0]
    metrics = Metrics()
    batcher = Batcher([rr], ServiceSettings(batching=False), metrics=metrics)
    batcher.start()

    async def main():
        slow.on.set()
        with pytest.raises(TimeoutError):  # the 504 path: the request's deadline passes mid-pass
            await batcher.submit(work("which enzyme digests starch?"), timeout=3 * LAYER_S)
        gone = time.perf_counter()
        second = asyncio.ensure_future(batcher.submit(work("where is Paris?"), timeout=30))
        while len(slow.passes) < 2:
            await asyncio.sleep(0.005)
        picked = slow.passes[1] - gone
        slow.on.clear()
        return picked, await second

    with caplog.at_level(logging.INFO, logger="routehead.service"):
        picked, got = asyncio.run(main())
    batcher.close()
    expected = rr.rerank("where is Paris?", DOCS)
    assert (got.ranking.indices, got.ranking.scores) == (expected.indices, expected.scores)
    assert picked < LAYER_S + SLACK, f"the worker took the next request {picked * 1000:.0f} ms after the timeout"
    assert metrics.cancelled_passes._value.get() == 1
    lines = _stop_lines(caplog)
    assert len(lines) == 1 and lines[0].exc_info is None


def test_a_disconnected_client_frees_the_worker_within_a_layer(slow_rr, slow: SlowLayers) -> None:
    rr = slow_rr[0]
    with live_server(create_app(rr, TEST_LIMITS, ServiceSettings(batching=False))) as base:
        slow.passes.clear()
        slow.on.set()
        with httpx.Client(base_url=base, timeout=3 * LAYER_S, trust_env=False) as c, \
                pytest.raises(httpx.TimeoutException):
            c.post("/rerank", json={"query": "which enzyme digests starch?", "documents": DOCS})
        gone = time.perf_counter()  # the client closed its connection
        answer: list[httpx.Response] = []

        def second() -> None:
            with httpx.Client(base_url=base, timeout=30, trust_env=False) as c2:
                answer.append(c2.post("/rerank", json={"query": "where is Paris?", "documents": DOCS}))

        t = threading.Thread(target=second)
        t.start()
        deadline = time.monotonic() + 10
        while len(slow.passes) < 2 and time.monotonic() < deadline:
            time.sleep(0.005)
        picked = slow.passes[1] - gone
        slow.on.clear()
        t.join(30)
        with httpx.Client(base_url=base, timeout=5, trust_env=False) as c:
            metrics = c.get("/metrics").text
    assert picked < LAYER_S + SLACK, f"the worker took the next request {picked * 1000:.0f} ms after the client left"
    assert answer and answer[0].status_code == 200, answer
    expected = rr.rerank("where is Paris?", DOCS)
    assert [r["index"] for r in answer[0].json()["results"]] == expected.indices
    assert "routehead_cancelled_passes_total 1.0" in metrics


def test_a_batch_with_a_request_still_awaited_runs_on(slow_rr, slow: SlowLayers) -> None:
    rr = slow_rr[0]
    metrics = Metrics()
    batcher = Batcher([rr], ServiceSettings(batching=True, max_batch_tokens=10_000), metrics=metrics)
    waited = work("where is Paris?")

    async def main():
        slow.on.set()
        abandoned = asyncio.ensure_future(batcher.submit(work("which enzyme digests starch?"), timeout=30))
        kept = asyncio.ensure_future(batcher.submit(waited, timeout=30))
        await asyncio.sleep(0.05)  # both queued before the worker starts: one call takes both
        batcher.start()
        while not slow.passes:
            await asyncio.sleep(0.005)
        abandoned.cancel()  # its client leaves mid-pass (what the handler does on a disconnect)
        with pytest.raises(asyncio.CancelledError):
            await abandoned
        before = slow.layer_calls
        await asyncio.sleep(3 * LAYER_S)
        ran_on = slow.layer_calls - before
        slow.on.clear()
        return ran_on, await kept

    ran_on, got = asyncio.run(main())
    batcher.close()
    assert ran_on >= 2  # layers kept running after the other request was abandoned
    assert got.batch_size == 2 and len(slow.passes) == 1  # one call for both, never restarted
    assert metrics.cancelled_passes._value.get() == 0
    expected = rr.rerank(waited.query, DOCS)
    assert got.ranking.indices == expected.indices
    np.testing.assert_allclose(got.ranking.scores, expected.scores, rtol=1e-5, atol=1e-7)


def test_sigterm_deadline_stops_the_running_pass_and_answers_json_503(slow_rr, slow: SlowLayers,
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    """SIGTERM while a pass longer than the grace runs (12 x ``LAYER_S`` = 2.4 s against 1 s): at the drain's
    deadline (0.8 s after the signal) the running request and the one queued behind it get a JSON 503 with
    Retry-After, the pass their answers left unawaited stops at its next layer boundary (counted, one log line),
    the queued request never reaches the model, and the server exits within the grace with no traceback logged.

    In-process: ``handle_exit`` is what uvicorn's SIGTERM handler calls (a subprocess would spend longer importing
    torch and warming the model up than the whole test; ``test_sigterm.py`` covers the real signal on a fake)."""
    rr, grace = slow_rr[0], 1.0
    settings = ServiceSettings(graceful_shutdown_s=grace, batching=False)
    app = create_app(rr, TEST_LIMITS, settings)
    batcher = app.state.service.batcher
    server = build_server(app, "127.0.0.1", 0, settings, log_level="warning", configure_logs=False)
    uvicorn_logs = logging.getLogger("uvicorn")  # uvicorn's dictConfig (an earlier test's server) stops propagation
    uvicorn_logs.addHandler(caplog.handler)
    answers: list[tuple[int, dict, str | None] | str] = []

    def post(query: str) -> None:
        try:
            r = httpx.post(f"{base}/rerank", json={"query": query, "documents": DOCS}, timeout=30, trust_env=False)
            answers.append((r.status_code, r.json(), r.headers.get("retry-after")))  # .json(): plain text fails
        except Exception as exc:  # a reset connection or a non-JSON body: reported by the assertion below
            answers.append(f"{type(exc).__name__}: {exc}")

    thread = threading.Thread(target=server.run, name="test-uvicorn", daemon=True)
    try:
        with caplog.at_level(logging.INFO):
            thread.start()
            deadline = time.monotonic() + 30
            while not (server.started and app.state.service.ready):
                assert thread.is_alive() and time.monotonic() < deadline, "the server did not become ready"
                time.sleep(0.01)
            base = f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
            slow.passes.clear()
            entered = slow.layer_calls
            slow.on.set()
            clients = [threading.Thread(target=post, args=(q,)) for q in ("which enzyme digests starch?",
                                                                          "where is Paris?")]
            for c in clients:
                c.start()
            while batcher.admitted < 2 or not slow.passes:  # one running, one queued behind it
                assert time.monotonic() < deadline, "the requests were not admitted"
                time.sleep(0.005)
            signalled = time.monotonic()
            server.handle_exit(signal.SIGTERM, None)
            thread.join(10)
            exited = time.monotonic() - signalled
            for c in clients:
                c.join(10)
            batcher._threads[0].join(5)  # the worker: free once the pass stopped
            entered = slow.layer_calls - entered
    finally:
        slow.on.clear()
        uvicorn_logs.removeHandler(caplog.handler)
        if thread.is_alive():
            server.should_exit = True
            thread.join(10)
    assert not thread.is_alive() and exited < grace + 1.0, f"exited {exited:.2f} s after SIGTERM (grace {grace} s)"
    assert len(answers) == 2, answers
    for got in answers:
        assert not isinstance(got, str), answers
        code, body, retry_after = got
        assert code == 503 and body["error"]["type"] == "not_ready", answers
        assert "shutting down" in body["error"]["message"] and retry_after == "1", answers
    assert len(slow.passes) == 1 and entered < LAYERS, f"{len(slow.passes)} pass(es), {entered} of {LAYERS} layers"
    assert not batcher._threads[0].is_alive()
    assert app.state.service.metrics.cancelled_passes._value.get() == 1
    lines = _stop_lines(caplog)
    assert len(lines) == 1 and lines[0].exc_info is None
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR], caplog.text
    assert "Traceback" not in caplog.text and "Cancel" not in caplog.text, caplog.text
