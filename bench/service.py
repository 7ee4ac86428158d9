"""Throughput and latency of the re-rank service under concurrent clients, batching on vs off; every status
counted and every answer checked against the sequential one.

    python bench/service.py [--clients 1 4 16] [--seconds 20] [--docs 5 --words 50] [--model smollm2-135m]
    python bench/service.py --model random:smollm2-135m --device cuda --data examples/scifact-mini   # a GPU
    python bench/service.py --clients 1 4 32 --seconds 60 --threads 1 --request-timeout 20   # overload: shedding
    python bench/service.py --clients 1 4 --settings off --dtype bfloat16 --out results/service-5x50-bf16.json

For each batching setting a real server (the service's own uvicorn settings) runs on 127.0.0.1 around the
default model on CPU; for each client count, that many threads send ``POST /v1/rerank`` back to back for
``--seconds`` (after a warm-up request each), all with SciFact queries and documents cut to ``--words`` words.
Prints and writes results/service-<docs>x<words>.json: requests/s and p50/p90/p99 latency per setting.

Statuses and answers: every response's HTTP status is counted (``statuses``: 200, 429, 503, 504, other), with
how many 429s carried ``Retry-After`` (``retry_after_429``); a client that gets a 429 or 503 with ``Retry-After``
waits that long (never past the end of its run) before its next request, as a well-behaved client does
(``--no-retry-wait``: send again at once). Before the concurrent runs each distinct request body is sent once,
sequentially, to the first setting's server, and its answer kept (the ranked indices, ``relevance_score`` and
``raw_score``; the bodies ask for ``raw_scores``); every 200 answer of a concurrent run is compared with it
(indices identical, scores equal within 1e-6 relative): ``checked`` answers, ``mismatches`` among them
(``index_mismatches``: the order differs; ``max_rel_diff``: the largest relative score difference where it
does not).
Requests/s and latency percentiles count 200s only. ``--request-timeout`` is the service's deadline (504 past
it; 429 at once when the queue ahead would keep a request past it); 600 s by default so that nothing is shed
in a throughput run; set it below the closed loop's queue wait to measure overload.

``--rates R ...`` adds open-loop runs: requests arrive at ``R`` per second (evenly spaced, each on its own
connection, whatever the server's pace) for ``--seconds``; latency is then queueing plus service, as a
user sees it at that load. The saturating rate is the closed-loop requests/s; half of it is the "half load" of
the latency goal (p99 within 2x p50).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import torch

from routehead.api import Reranker
from routehead.selection import DEFAULT_METHOD
from routehead.service import ServiceSettings, create_app
from routehead.service.run import build_server
from routehead.testing.random_models import random_lm

STATUSES = ("200", "429", "503", "504", "other")
REL_TOL = 1e-6


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def body_key(payload: dict) -> str:
    """One string per distinct request body."""
    return json.dumps(payload, sort_keys=True)


def answer(body: dict) -> tuple[tuple[int, ...], tuple[float, ...], tuple[float | None, ...]]:
    """The ranking of a /v1/rerank answer: result indices, relevance scores, raw scores."""
    results = body["results"]
    return (tuple(int(r["index"]) for r in results), tuple(float(r["relevance_score"]) for r in results),
            tuple(r.get("raw_score") for r in results))


def rel_diff(a: tuple, b: tuple) -> float:
    """The largest relative difference between the relevance and raw scores of two answers (inf where their
    shapes differ)."""
    worst = 0.0
    for xs, ys in ((a[1], b[1]), (a[2], b[2])):
        if len(xs) != len(ys):
            return math.inf
        for x, y in zip(xs, ys):
            if x is None or y is None:
                if x is not y:
                    return math.inf
            elif x != y:
                worst = max(worst, abs(x - y) / max(abs(x), abs(y)))
    return worst


def same_answer(a: tuple, b: tuple) -> bool:
    """Indices identical, relevance and raw scores equal within ``REL_TOL`` relative."""
    return a[0] == b[0] and rel_diff(a, b) <= REL_TOL


def status_class(code: int) -> str:
    return str(code) if str(code) in STATUSES else "other"


def retry_after_s(resp: httpx.Response) -> float | None:
    """``Retry-After`` in seconds, or None where absent or not a number."""
    value = resp.headers.get("retry-after")
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


class Tally:
    """Latencies of the answered requests, every status, and answer checks, shared by client threads."""

    def __init__(self, reference: dict[str, tuple] | None = None) -> None:
        self.latencies: list[float] = []
        self.errors = 0
        self.statuses: Counter[str] = Counter({s: 0 for s in STATUSES})
        self.retry_after_429 = 0
        self.shed_latencies: list[float] = []  # time to a 429: how early overload is answered
        self.reference = reference or {}
        self.checked = 0
        self.mismatches = 0  # indices differ, or a score beyond REL_TOL
        self.index_mismatches = 0  # indices differ
        self.max_rel_diff = 0.0  # the largest relative score difference seen (same indices)
        self.mismatch_examples: list[dict] = []
        self.lock = threading.Lock()

    def timed(self, send, key: str | None = None) -> float | None:
        """Send, record; the response's ``Retry-After`` (s) where it is a 429 or 503, else None."""
        t = time.perf_counter()
        resp = send()
        dt = time.perf_counter() - t
        ok = resp.status_code == 200
        expected = self.reference.get(key) if ok and key is not None else None
        got = answer(resp.json()) if expected is not None else None
        wait = retry_after_s(resp) if resp.status_code in (429, 503) else None
        with self.lock:
            self.statuses[status_class(resp.status_code)] += 1
            if ok:
                self.latencies.append(dt)
            else:
                self.errors += 1
            if resp.status_code == 429:
                self.shed_latencies.append(dt)
                self.retry_after_429 += wait is not None
            if expected is not None:
                self._check(key, expected, got)
        return wait

    def _check(self, key: str, expected: tuple, got: tuple) -> None:
        self.checked += 1
        if expected[0] != got[0]:
            self.index_mismatches += 1
        else:
            self.max_rel_diff = max(self.max_rel_diff, rel_diff(expected, got))
        if not same_answer(expected, got):
            self.mismatches += 1
            if len(self.mismatch_examples) < 3:
                self.mismatch_examples.append({"query": json.loads(key)["query"][:80], "expected": expected,
                                               "got": got})

    def summary(self) -> dict:
        lat = self.latencies
        out = {"requests": len(lat), "errors": self.errors}
        if lat:
            out.update({"p50_s": round(percentile(lat, 0.5), 3), "p90_s": round(percentile(lat, 0.9), 3),
                        "p99_s": round(percentile(lat, 0.99), 3), "mean_s": round(statistics.mean(lat), 3)})
        else:
            out.update({"p50_s": None, "p90_s": None, "p99_s": None, "mean_s": None})
        out.update({"statuses": {s: self.statuses[s] for s in STATUSES}, "retry_after_429": self.retry_after_429,
                    "max_429_s": round(max(self.shed_latencies), 3) if self.shed_latencies else None,
                    "checked": self.checked, "mismatches": self.mismatches,
                    "index_mismatches": self.index_mismatches, "max_rel_diff": float(f"{self.max_rel_diff:.3g}")})
        if self.mismatch_examples:
            out["mismatch_examples"] = self.mismatch_examples
        return out


def run_clients(base: str, payloads: list[dict], clients: int, seconds: float,
                reference: dict[str, tuple] | None = None, retry_wait: bool = True) -> dict:
    """Closed loop: ``clients`` threads, each sending back to back for ``seconds`` (after a 429/503, waiting its
    ``Retry-After`` where ``retry_wait``)."""
    tally = Tally(reference)
    stop = time.perf_counter() + seconds
    keys = [body_key(p) for p in payloads]

    def client(k: int) -> None:
        with httpx.Client(base_url=base, timeout=600, trust_env=False) as c:
            i = k
            while time.perf_counter() < stop:
                j = i % len(payloads)
                wait = tally.timed(lambda j=j: c.post("/v1/rerank", json=payloads[j]), keys[j])
                if wait and retry_wait:
                    time.sleep(max(0.0, min(wait, stop - time.perf_counter())))
                i += clients

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    return {"clients": clients, "wall_s": round(wall, 2), "requests_per_s": round(len(tally.latencies) / wall, 3),
            **tally.summary()}


def run_rate(base: str, payloads: list[dict], rate: float, seconds: float,
             reference: dict[str, tuple] | None = None) -> dict:
    """Open loop: one request every ``1 / rate`` s for ``seconds``, each in its own thread."""
    tally = Tally(reference)

    def one(i: int) -> None:
        p = payloads[i % len(payloads)]
        tally.timed(lambda: httpx.post(f"{base}/v1/rerank", json=p, timeout=600, trust_env=False), body_key(p))

    t0 = time.perf_counter()
    threads = []
    for i in range(max(1, int(rate * seconds))):
        time.sleep(max(0.0, t0 + i / rate - time.perf_counter()))
        threads.append(threading.Thread(target=one, args=(i,)))
        threads[-1].start()
    for t in threads:
        t.join()
    out = {"rate": rate, **tally.summary()}
    ratio = round(out["p99_s"] / out["p50_s"], 2) if out["p50_s"] else None
    return {**out, "p99_over_p50": ratio}


def reference_answers(base: str, payloads: list[dict]) -> tuple[dict[str, tuple], float]:
    """Each distinct body sent once, one after another: its answer, and the seconds it all took."""
    ref: dict[str, tuple] = {}
    t0 = time.perf_counter()
    with httpx.Client(base_url=base, timeout=600, trust_env=False) as c:
        for p in payloads:
            key = body_key(p)
            if key not in ref:
                ref[key] = answer(post_until_ok(c, p).json())
    return ref, time.perf_counter() - t0


def load_payloads(data: str, docs: int, words: int) -> list[dict]:
    lines = open(f"{data}/corpus.jsonl").read().splitlines()[: docs * 20]
    corpus = [json.loads(line) for line in lines]
    texts = [" ".join(f"{d['title']}. {d['text']}".split()[:words]) for d in corpus]
    queries = [json.loads(line)["text"] for line in open(f"{data}/queries.jsonl").read().splitlines()[:40]]
    return [{"query": q, "documents": texts[(i * docs) % len(texts):][:docs] or texts[:docs], "raw_scores": True}
            for i, q in enumerate(queries)]


def start_server(rr: Reranker, settings: ServiceSettings):
    """The service's own uvicorn on a free port of 127.0.0.1, once ready: (server, thread, base URL)."""
    server = build_server(create_app(rr, settings=settings), "127.0.0.1", 0, settings, log_level="warning")
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    base = f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
    while httpx.get(f"{base}/ready", timeout=60, trust_env=False).status_code != 200:  # its own warm-up done
        time.sleep(0.1)
    return server, thread, base


def post_until_ok(c: httpx.Client, payload: dict, tries: int = 3) -> httpx.Response:
    """A request sent until it is answered 200, at most ``tries`` times (a short ``--request-timeout`` on a busy
    box may 504 a lone request); raises on the last failure."""
    for k in range(tries):
        resp = c.post("/v1/rerank", json=payload)
        if resp.status_code == 200 or k == tries - 1:
            return resp.raise_for_status()
    raise AssertionError("unreachable")


def run_setting(rr: Reranker, setting: str, args, payloads: list[dict], out: dict) -> list[dict]:
    """One batching setting's server: warm-up, the sequential answers (first setting only), the runs."""
    settings = ServiceSettings(batching=setting == "on", max_batch_tokens=args.max_batch_tokens,
                               request_timeout_s=args.request_timeout)
    server, thread, base = start_server(rr, settings)
    try:
        with httpx.Client(base_url=base, timeout=600, trust_env=False) as c:
            post_until_ok(c, payloads[0])  # the warm-up
        if "reference" not in out:
            ref, took = reference_answers(base, payloads)
            out["reference"] = {"batching": setting, "bodies": len(ref), "seconds": round(took, 2)}
            out["_answers"] = ref
            print(json.dumps({"reference": out["reference"]}), flush=True)
        ref = out["_answers"]
        rows = []
        for clients in args.clients:
            rows.append(run_clients(base, payloads, clients, args.seconds, ref, args.retry_wait))
            rows[-1]["load_1min"] = round(os.getloadavg()[0], 2)  # the box's load over the run's last minute
            print(json.dumps({"batching": setting, **rows[-1]}), flush=True)
        for rate in args.rates:
            rows.append(run_rate(base, payloads, rate, args.seconds, ref))
            print(json.dumps({"batching": setting, **rows[-1]}), flush=True)
    finally:
        server.should_exit = True
        thread.join(30)
    return rows


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--docs", type=int, default=5)
    ap.add_argument("--words", type=int, default=50)
    ap.add_argument("--model", default=None)
    ap.add_argument("--method", default=DEFAULT_METHOD, help=f"default {DEFAULT_METHOD} (the service default)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", default=None, help="float32 | bfloat16 | auto (default: auto, the service's)")
    ap.add_argument("--max-batch-tokens", type=int, default=16384)
    ap.add_argument("--request-timeout", type=float, default=600.0,
                    help="the service's deadline in s (504 past it; 429 when the queue would keep a request past it)")
    ap.add_argument("--retry-wait", action=argparse.BooleanOptionalAction, default=True,
                    help="a client waits a 429/503's Retry-After before its next request (default: yes)")
    ap.add_argument("--data", default="../shared/data/scifact")
    ap.add_argument("--settings", nargs="+", default=["on", "off"], choices=["on", "off"])
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's own)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--rates", type=float, nargs="*", default=[], help="open-loop arrival rates (requests/s)")
    return ap.parse_args()


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    payloads = load_payloads(args.data, args.docs, args.words)
    model = args.model
    if model and model.startswith("random:"):  # a random-weight model of a real shape, e.g. on a GPU
        model = random_lm(model.split(":", 1)[1], args.device or ("cuda" if torch.cuda.is_available() else "cpu"),
                          args.dtype)
    rr = Reranker(model=model, method=args.method, device=args.device, dtype=args.dtype)
    out = {"model": rr.lm.name, "method": args.method, "dtype": str(rr.lm.dtype).replace("torch.", ""),
           "docs": args.docs, "words": args.words,
           "seconds": args.seconds, "request_timeout_s": args.request_timeout, "retry_wait": args.retry_wait,
           "rel_tol": REL_TOL, "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
           "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
           "date": time.strftime("%Y-%m-%d"), "runs": {}}
    for setting in args.settings:
        out["runs"][setting] = run_setting(rr, setting, args, payloads, out)
    out.pop("_answers", None)
    out["load_average"] = [round(x, 2) for x in os.getloadavg()]
    Path("results").mkdir(exist_ok=True)
    path = Path(args.out or f"results/service-{args.docs}x{args.words}.json")
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(f"-> {path}")


if __name__ == "__main__":
    main()
