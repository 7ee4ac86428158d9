"""Fill the head-score store for the benchmark collections (resumable; run again to continue).

    python bench/collect_scores.py --model smollm2-135m --jobs scifact:test scifact:train trec-dl19-passage:test
"""

from __future__ import annotations

import argparse
import time

import torch

from routehead.engine.model import load_model
from routehead.engine.scorer import HeadScorer
from routehead.offline.collect import score_collection
from routehead.offline.data import load_collection

# name:split[:max_queries]; scifact train is done 200 queries first on CPU (about 7 s a query on 2 cores)
DEFAULT_JOBS = ["scifact:train:200", "scifact:test:150", "trec-dl19-passage:test", "adi:test", "med:test", "cisi:test",
                "cranfield:test", "scifact:test", "scifact:train:400", "scifact:train"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default=None)
    ap.add_argument("--data-root", default="../shared/data")
    ap.add_argument("--jobs", nargs="+", default=DEFAULT_JOBS)
    ap.add_argument("--top-k", type=int, default=20)
    ap.add_argument("--max-doc-tokens", type=int, default=160)
    ap.add_argument("--max-queries", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    lm = load_model(args.model)
    scorer = HeadScorer(lm, max_doc_tokens=args.max_doc_tokens)
    for job in args.jobs:
        name, split, *cap = job.split(":")
        coll = load_collection(f"{args.data_root}/{name}", split)
        t = time.time()
        sc = score_collection(coll, scorer, scorer.settings(), top_k=args.top_k,
                              max_queries=int(cap[0]) if cap else args.max_queries)
        print(f"{job}: {len(sc.entries)} queries stored ({time.time() - t:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
