"""Options shared by the commands, derived from the settings dataclasses (:mod:`routehead.settings`), so each
default is written once and the help always says it."""

from __future__ import annotations

import argparse
import sys
from dataclasses import MISSING, fields
from typing import Any

from routehead.offline.job import ScoreJob
from routehead.settings import ORDERS, ScoringSettings

_TYPES = (("bool", None), ("int", int), ("float", float))


def add_field(p: argparse.ArgumentParser, cls: type, name: str, **overrides: Any) -> None:
    """``--name`` for field ``name`` of settings dataclass ``cls``: its type, default, choices and help."""
    f = next(f for f in fields(cls) if f.name == name)
    default = overrides.pop("default", f.default if f.default is not MISSING else None)
    kind = next((t for key, t in _TYPES if key in str(f.type)), str)
    kw: dict[str, Any] = {"default": default, "help": f"{f.metadata.get('help', '')} (default {default})"}
    if "bool" in str(f.type):
        kw["action"] = "store_true"
    else:
        kw["type"] = kind
        if "choices" in f.metadata:
            kw["choices"] = list(f.metadata["choices"])
    kw.update(overrides)
    p.add_argument("--" + name.replace("_", "-"), **kw)


def model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="hub id, local folder, .gguf file, or an embedded name "
                   "(smollm2-135m [default], gemma3-270m)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--dtype", default=None, help="float32 (CPU default) | bfloat16 (CUDA default) | float16")
    p.add_argument("--trust-remote-code", action="store_true", help="allow model code from the hub (off by default)")


def data_args(p: argparse.ArgumentParser, split: str, several: bool = False) -> None:
    """A collection split scored into the store (:class:`ScoreJob`); ``several``: one or more, each
    ``PATH[:SPLIT]`` (:func:`jobs_from`)."""
    if several:
        p.add_argument("--data", required=True, nargs="+", metavar="PATH[:SPLIT]",
                       help="one or more BEIR-layout folders (corpus.jsonl, queries.jsonl, qrels/), each with its "
                       "split after a colon (default --split); several are used together, their query ids "
                       "namespaced <collection>/<split>/<id>")
    else:
        p.add_argument("--data", required=True, help="a BEIR-layout folder (corpus.jsonl, queries.jsonl, qrels/)")
    p.add_argument("--split", default=split)
    p.add_argument("--max-queries", type=int, default=None, help="only the first N queries (quick runs)")
    for name in ("top_k", "max_doc_tokens", "max_chunks_per_doc", "retrieval_type", "layout", "batch_size"):
        add_field(p, ScoringSettings, name)
    # a store holds one single-pass order ("both" is two stores)
    add_field(p, ScoringSettings, "doc_order", choices=[o for o in ORDERS if o != "both"])
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--stored-only", action="store_true", help="use only the queries already in the store "
                   "(no forward passes; the rest are left out)")
    model_args(p)


def job_from(args: argparse.Namespace) -> ScoreJob:
    """The :class:`ScoreJob` a command's options describe."""
    scoring = ScoringSettings(**{f.name: getattr(args, f.name) for f in fields(ScoringSettings)
                                 if hasattr(args, f.name)})
    return ScoreJob(data=args.data, split=args.split, model=args.model, device=args.device, dtype=args.dtype,
                    trust_remote_code=args.trust_remote_code, max_queries=args.max_queries, scoring=scoring,
                    shard=tuple(getattr(args, "shard", (0, 1))), stored_only=args.stored_only,
                    progress=not args.no_progress)


def data_spec(spec: str, split: str) -> tuple[str, str]:
    """``PATH[:SPLIT]`` as (path, split), ``split`` when none is given (a colon followed by a path is the path's)."""
    path, sep, tail = spec.rpartition(":")
    if sep and path and tail and "/" not in tail and "\\" not in tail:
        return path, tail
    return spec, split


def jobs_from(args: argparse.Namespace) -> list[ScoreJob]:
    """One :class:`ScoreJob` per ``--data PATH[:SPLIT]``, each with the command's other options."""
    from dataclasses import replace

    job = job_from(argparse.Namespace(**{**vars(args), "data": None}))
    specs = args.data if isinstance(args.data, list) else [args.data]
    return [replace(job, data=path, split=split) for path, split in (data_spec(d, args.split) for d in specs)]


def print_warnings(collection: Any) -> None:
    """What the loader noticed about a collection (judged documents outside the pool, empty queries, ...), once
    per command, on stderr, so a figure is never read without it."""
    for w in getattr(collection, "warnings", []):
        print(f"routehead: warning: {collection.name}/{collection.split}: {w}", file=sys.stderr)
