"""Throughput and latency of the re-rank service under concurrent clients, batching on vs off.

    python bench/service.py [--clients 1 4 16] [--seconds 20] [--docs 5 --words 50] [--model smollm2-135m]
    python bench/service.py --model random:smollm2-135m --device cuda --data examples/scifact-mini   # a GPU

For each batching setting a real server (the service's own uvicorn settings) runs on 127.0.0.1 around the
default model on CPU; for each client count, that many threads send ``POST /v1/rerank`` back to back for
``--seconds`` (after a warm-up request each), all with SciFact queries and documents cut to ``--words`` words.
Prints and writes results/service-<docs>x<words>.json: requests/s and p50/p90/p99 latency per setting.

``--rates R ...`` adds open-loop runs: requests arrive at ``R`` per second (evenly spaced, each on its own
connection, whatever the server's pace) for ``--seconds``; latency is then queueing plus service, as a
user sees it at that load. The saturating rate is the closed-loop requests/s; half of it is the "half load" of
the latency goal (p99 within 2x p50).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import threading
import time
from pathlib import Path

import httpx
import torch

from routehead.api import Reranker
from routehead.selection import DEFAULT_METHOD
from routehead.service import ServiceSettings, create_app
from routehead.service.run import build_server
from routehead.testing.random_models import random_lm


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


class Tally:
    """Latencies of the answered requests and a count of the others, shared by client threads."""

    def __init__(self) -> None:
        self.latencies: list[float] = []
        self.errors = 0
        self.lock = threading.Lock()

    def timed(self, send) -> None:
        t = time.perf_counter()
        ok = send().status_code == 200
        dt = time.perf_counter() - t
        with self.lock:
            if ok:
                self.latencies.append(dt)
            else:
                self.errors += 1

    def summary(self) -> dict:
        lat = self.latencies
        return {"requests": len(lat), "errors": self.errors, "p50_s": round(percentile(lat, 0.5), 3),
                "p90_s": round(percentile(lat, 0.9), 3), "p99_s": round(percentile(lat, 0.99), 3),
                "mean_s": round(statistics.mean(lat), 3)}


def run_clients(base: str, payloads: list[dict], clients: int, seconds: float) -> dict:
    """Closed loop: ``clients`` threads, each sending back to back for ``seconds``."""
    tally = Tally()
    stop = time.perf_counter() + seconds

    def client(k: int) -> None:
        with httpx.Client(base_url=base, timeout=600, trust_env=False) as c:
            i = k
            while time.perf_counter() < stop:
                tally.timed(lambda i=i: c.post("/v1/rerank", json=payloads[i % len(payloads)]))
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


def run_rate(base: str, payloads: list[dict], rate: float, seconds: float) -> dict:
    """Open loop: one request every ``1 / rate`` s for ``seconds``, each in its own thread."""
    tally = Tally()

    def one(i: int) -> None:
        tally.timed(lambda: httpx.post(f"{base}/v1/rerank", json=payloads[i % len(payloads)], timeout=600,
                                       trust_env=False))

    t0 = time.perf_counter()
    threads = []
    for i in range(max(1, int(rate * seconds))):
        time.sleep(max(0.0, t0 + i / rate - time.perf_counter()))
        threads.append(threading.Thread(target=one, args=(i,)))
        threads[-1].start()
    for t in threads:
        t.join()
    out = {"rate": rate, **tally.summary()}
    return {**out, "p99_over_p50": round(out["p99_s"] / out["p50_s"], 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--docs", type=int, default=5)
    ap.add_argument("--words", type=int, default=50)
    ap.add_argument("--model", default=None)
    ap.add_argument("--method", default=DEFAULT_METHOD, help=f"default {DEFAULT_METHOD} (the service default)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--max-batch-tokens", type=int, default=16384)
    ap.add_argument("--data", default="../shared/data/scifact")
    ap.add_argument("--settings", nargs="+", default=["on", "off"], choices=["on", "off"])
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's own)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--rates", type=float, nargs="*", default=[], help="open-loop arrival rates (requests/s)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    lines = open(f"{args.data}/corpus.jsonl").read().splitlines()[: args.docs * 20]
    corpus = [json.loads(line) for line in lines]
    texts = [" ".join(f"{d['title']}. {d['text']}".split()[: args.words]) for d in corpus]
    queries = [json.loads(line)["text"] for line in open(f"{args.data}/queries.jsonl").read().splitlines()[:40]]
    payloads = [{"query": q, "documents": texts[(i * args.docs) % len(texts):][: args.docs] or texts[: args.docs]}
                for i, q in enumerate(queries)]
    model = args.model
    if model and model.startswith("random:"):  # a random-weight model of a real shape, e.g. on a GPU
        model = random_lm(model.split(":", 1)[1], args.device or ("cuda" if torch.cuda.is_available() else "cpu"),
                          None)
    rr = Reranker(model=model, method=args.method, device=args.device)
    out = {"model": rr.lm.name, "method": args.method, "docs": args.docs, "words": args.words,
           "seconds": args.seconds, "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
           "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
           "date": time.strftime("%Y-%m-%d"), "runs": {}}
    for setting in args.settings:
        settings = ServiceSettings(batching=setting == "on", max_batch_tokens=args.max_batch_tokens,
                                   request_timeout_s=600)
        server = build_server(create_app(rr, settings=settings), "127.0.0.1", 0, settings, log_level="warning")
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        while not server.started:
            time.sleep(0.05)
        base = f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
        httpx.post(f"{base}/v1/rerank", json=payloads[0], timeout=600, trust_env=False).raise_for_status()
        rows = []
        for clients in args.clients:
            row = run_clients(base, payloads, clients, args.seconds)
            rows.append(row)
            print(json.dumps({"batching": setting, **row}), flush=True)
        for rate in args.rates:
            row = run_rate(base, payloads, rate, args.seconds)
            rows.append(row)
            print(json.dumps({"batching": setting, **row}), flush=True)
        out["runs"][setting] = rows
        server.should_exit = True
        thread.join(30)
    Path("results").mkdir(exist_ok=True)
    path = Path(args.out or f"results/service-{args.docs}x{args.words}.json")
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(f"-> {path}")


if __name__ == "__main__":
    main()
