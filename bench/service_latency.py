"""Latency of POST /rerank for 20 SciFact documents on the default model (CPU), through a real server.

    python bench/service_latency.py [--method route] [--requests 10] [--docs 20]

Starts the service (`routehead.service`) with uvicorn on 127.0.0.1 (a free port), sends sequential requests with
httpx, and prints one JSON object: median and p90 latency, and the in-library time for the same input (so the HTTP
overhead is visible). Writes results/service-latency.json.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import threading
import time
from pathlib import Path

import httpx
import uvicorn

from routehead.api import Reranker
from routehead.service import create_app


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--method", default="route")
    ap.add_argument("--requests", type=int, default=10)
    ap.add_argument("--docs", type=int, default=20)
    ap.add_argument("--data", default="../shared/data/scifact")
    args = ap.parse_args()
    corpus = [json.loads(line) for _, line in zip(range(args.docs), open(f"{args.data}/corpus.jsonl"))]
    docs = [" ".join(f"{d['title']}. {d['text']}".split()[:120]) for d in corpus]
    queries = [json.loads(line)["text"] for _, line in zip(range(args.requests), open(f"{args.data}/queries.jsonl"))]
    rr = Reranker(method=args.method)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(rr), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    http, lib = [], []
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=600, trust_env=False) as client:
        client.post("/rerank", json={"query": "warm up", "documents": docs[:2]}).raise_for_status()
        for q in queries:
            t = time.perf_counter()
            r = client.post("/rerank", json={"query": q, "documents": docs, "return_heads": True})
            r.raise_for_status()
            http.append(time.perf_counter() - t)
            t = time.perf_counter()
            rr.rerank(q, docs)
            lib.append(time.perf_counter() - t)
    server.should_exit = True
    thread.join(timeout=10)
    out = {"method": args.method, "model": rr.lm.name, "docs": args.docs, "requests": len(http),
           "http_median_s": statistics.median(http), "http_p90_s": sorted(http)[int(0.9 * (len(http) - 1))],
           "library_median_s": statistics.median(lib), "date": time.strftime("%Y-%m-%d")}
    Path("results").mkdir(exist_ok=True)
    Path("results/service-latency.json").write_text(json.dumps(out, indent=1))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
