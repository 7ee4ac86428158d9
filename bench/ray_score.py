"""Queries/s of ``routehead score`` in one process vs ``score --ray N``, each into a fresh store.

    python bench/ray_score.py --data ../shared/data/scifact --split test --max-queries 10 --actors 1 2

Each configuration runs the CLI as a subprocess (what a user types) and reports two rates: over the whole command
(Python start, Ray start, model loads, BM25, scoring) and, for Ray, over the actors' time the command prints (from
handing out the shards to the last one stored: each actor's model load, BM25 first stage and scoring).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run(cmd: list[str], store: str) -> tuple[float, str]:
    env = {**os.environ, "ROUTEHEAD_STORE": store}
    t0 = time.perf_counter()
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if out.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{out.stderr[-3000:]}")
    return wall, out.stdout.strip().splitlines()[-1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="../shared/data/scifact")
    ap.add_argument("--split", default="test")
    ap.add_argument("--max-queries", type=int, default=10)
    ap.add_argument("--actors", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--model", default=None)
    ap.add_argument("--out", default=None, help="also write the results as JSON")
    args = ap.parse_args()
    exe = str(Path(sys.executable).with_name("routehead"))
    base = [exe, "score", "--data", args.data, "--split", args.split, "--max-queries", str(args.max_queries),
            "--no-progress"] + (["--model", args.model] if args.model else [])
    rows = []
    for actors in [0, *args.actors]:
        with tempfile.TemporaryDirectory() as store:
            cmd = base + (["--ray", str(actors)] if actors else [])
            wall, line = run(cmd, store)
        stored = int(line.split()[0])
        m = re.search(r"Ray actors?, ([\d.]+) s\)", line)
        scoring = float(m.group(1)) if m else None
        row = {"config": f"--ray {actors}" if actors else "single process", "stored": stored,
               "wall_s": round(wall, 1), "queries_per_s_wall": round(stored / wall, 3),
               "actors_s": scoring, "queries_per_s_actors": round(stored / scoring, 3) if scoring else None,
               "command": " ".join(["routehead", *cmd[1:]])}
        rows.append(row)
        print(json.dumps(row), flush=True)
    info = {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}",
            "load_avg_after": os.getloadavg(), "rows": rows}
    if args.out:
        Path(args.out).write_text(json.dumps(info, indent=2) + "\n")
    print(json.dumps({k: v for k, v in info.items() if k != "rows"}))


if __name__ == "__main__":
    main()
