"""On-disk store of per-head score tensors ``S[layer, head, doc]`` (one LLM forward per query).

The tensors are the shared input of every attention-based re-ranker and cost a forward pass each, so
they are computed once, stored, and reused. Layout::

    root/<collection>/<split>/<model-slug>-<hash12>/
        meta.json            settings, creation time, array layout
        shard-00000.npz      entries flushed together (np.savez_compressed, no pickle)
        shard-00001.npz      ...

Each entry holds the per-head document scores (each head masked alone: QRHead's detection score; and, where
stored, each head's unmasked, uncalibrated attention mass: CoRe's) and, optionally, the per-token calibrated
scores of the stored heads over every document's span (:class:`Tokens`): what offline work (ICR, static sets,
label search, router training, the oracle) needs to aggregate exactly as inference does, summing heads before
the outlier mask. Token rows are float16 with a float32 scale per row (a row divided by its largest magnitude),
the all-heads token sum float32. A chunked store (``max_chunks_per_doc`` > 1 in its settings) holds token rows per
chunk (``Tokens.chunks``: how many chunks each document has, its chunks' spans adjacent); its per-head document
scores are already the maximum over a document's chunks (MaxP, as the live pass gives them).

``hash12`` is the first 12 hex digits of the SHA-256 of the canonical JSON of the settings, so any
change in model, prompt, top-k, ... gets a fresh directory. Shards are written to a temporary file and
then linked into place, so an interrupted run never leaves a half-written shard and several processes
(see :func:`shard_filter`) can fill the same store without overwriting each other's shards.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import time
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from routehead.errors import RouteheadError

if TYPE_CHECKING:
    from typing_extensions import Self

__all__ = ["Entry", "HeadScoreStore", "Tokens", "settings_hash", "shard_filter"]

LAYOUT = ["layer", "head", "doc"]
_SHARD_RE = re.compile(r"^shard-(\d{5,})\.npz$")
_KEYS = ("qids", "counts", "doc_ids", "calibrated", "raw", "shape")
_TOKEN_KEYS = ("tok_heads", "tok_rows", "tok_scale", "tok_counts", "tok_total", "positions")
_CHUNK_KEY = "tok_chunks"  # chunked stores only: chunks per document (tok_counts is then per chunk)


@dataclass(frozen=True)
class Tokens:
    """Per-token calibrated scores of one query: ``rows`` ``[heads, T]`` float16 times ``scale`` ``[heads]``;
    document d's tokens are the ``counts[d]`` columns after those of documents ``< d``; ``total`` ``[T]`` is
    the sum over all heads (ICR); ``positions[d]`` is document d's place in the prompt (0 = first).

    Chunked (``chunks`` not None): ``counts`` are per chunk, document d's ``chunks[d]`` chunks after those of
    documents ``< d``; a document's score is the maximum of its chunks' (:meth:`document_max`)."""

    heads: np.ndarray  # [n, 2] (layer, head) of each row, shared by every entry of a store
    rows: np.ndarray
    scale: np.ndarray
    counts: np.ndarray
    total: np.ndarray
    positions: np.ndarray
    chunks: np.ndarray | None = None

    @classmethod
    def encode(cls, heads: np.ndarray, rows: np.ndarray, counts: np.ndarray, total: np.ndarray,
               positions: np.ndarray, chunks: np.ndarray | None = None) -> Tokens:
        rows = np.asarray(rows, dtype=np.float32)
        scale = np.abs(rows).max(axis=1) if rows.size else np.zeros(len(rows), np.float32)
        scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
        return cls(np.asarray(heads, dtype=np.int64).reshape(-1, 2), (rows / scale[:, None]).astype(np.float16),
                   scale, np.asarray(counts, dtype=np.int64), np.asarray(total, dtype=np.float32),
                   np.asarray(positions, dtype=np.int64), None if chunks is None else np.asarray(chunks, np.int64))

    @property
    def num_docs(self) -> int:
        return len(self.positions)

    def document_max(self, passage_scores: np.ndarray) -> np.ndarray:
        """Per-passage scores ``[..., spans]`` as per-document ones: unchanged unchunked, else the maximum over
        each document's chunks (MaxP)."""
        if self.chunks is None:
            return passage_scores
        starts = np.concatenate([[0], np.cumsum(self.chunks)[:-1]]).astype(np.int64)
        return np.maximum.reduceat(passage_scores, starts, axis=-1)

    def decoded(self, index: np.ndarray | list[int] | None = None) -> np.ndarray:
        """float32 rows ``[len(index), T]`` (all rows when None)."""
        sel = slice(None) if index is None else np.asarray(index)
        return self.rows[sel].astype(np.float32) * self.scale[sel][:, None]


@dataclass(frozen=True)
class Entry:
    """Stored scores of one query: ``calibrated`` and ``raw`` (each head masked alone) are float32
    ``[layer, head, doc]``; ``raw_sum`` the same shape, each head's attention mass on the document's tokens,
    neither calibrated nor masked (CoRe's detection score)."""

    doc_ids: list[str]
    calibrated: np.ndarray
    raw: np.ndarray
    tokens: Tokens | None = None
    raw_sum: np.ndarray | None = None


def _canonical(settings: dict) -> str:
    try:
        return json.dumps(settings, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise RouteheadError(f"store settings must be plain JSON (str, numbers, lists, dicts): {exc}") from None


def settings_hash(settings: dict) -> str:
    """First 12 hex digits of the SHA-256 of the settings' canonical JSON (sorted keys, compact)."""
    return hashlib.sha256(_canonical(settings).encode("utf-8")).hexdigest()[:12]


def _slug(name: str) -> str:
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", str(name)).strip("-.")
    return slug[:80] or "model"


def _path_part(value: object, what: str) -> str:
    text = str(value)
    if not text or text in (".", "..") or "/" in text or "\\" in text or "\x00" in text:
        raise RouteheadError(f"store settings[{what!r}] = {text!r} cannot be used as a folder name")
    return text


def store_path(root: str | Path, settings: dict) -> Path:
    """The folder of the store for ``settings`` under ``root`` (``<collection>/<split>/<model>-<hash>``), without
    opening it."""
    return (Path(root) / _path_part(settings["collection"], "collection") / _path_part(settings["split"], "split")
            / f"{_slug(settings.get('model', 'model'))}-{settings_hash(settings)}")


def shard_filter(qids: list[str], shard: int, num_shards: int) -> list[str]:
    """The queries process ``shard`` of ``num_shards`` should handle: every ``num_shards``-th by position.

    Stable for a given list, disjoint across shards and together covering all of ``qids``.
    """
    if num_shards < 1 or not 0 <= shard < num_shards:
        raise RouteheadError(f"need 0 <= shard < num_shards, got shard={shard}, num_shards={num_shards}")
    return [q for i, q in enumerate(qids) if i % num_shards == shard]


class HeadScoreStore:
    """Append-only, resumable store of head-score tensors for one collection, split and setting.

    ``settings`` must be JSON-serialisable and contain ``"collection"`` and ``"split"`` (they name the
    folders); ``"model"`` names the slug. Typical use::

        store = HeadScoreStore(root, settings)
        for qid in qids:
            if qid in store.done():
                continue
            store.add(qid, doc_ids, calibrated, raw)   # flushed every ``auto_flush_every`` adds
        store.flush()

    It is also a context manager that flushes on exit (even on error, so finished work is kept).
    """

    def __init__(self, root: str | Path, settings: dict, auto_flush_every: int = 25) -> None:
        if not isinstance(settings, dict):
            raise RouteheadError("store settings must be a dict")
        for key in ("collection", "split"):
            if key not in settings:
                raise RouteheadError(f"store settings need a {key!r} entry (it names the store folder)")
        if auto_flush_every < 1:
            raise RouteheadError(f"auto_flush_every must be >= 1, got {auto_flush_every}")
        canonical = _canonical(settings)
        self.settings: dict = json.loads(canonical)
        self.auto_flush_every = auto_flush_every
        self.hash = settings_hash(settings)
        self.path = store_path(root, settings)
        self._buffer: dict[str, Entry] = {}
        self._shard_qids: dict[str, list[str]] = {}  # shard file name -> qids (shards are immutable)
        self._shape: tuple[int, int] | None = None  # (layers, heads) shared by all entries
        self._open(canonical)

    # ---------------------------------------------------------------- setup
    def _open(self, canonical: str) -> None:
        meta_file = self.path / "meta.json"
        if not meta_file.is_file():
            self.path.mkdir(parents=True, exist_ok=True)
            if self._shard_files():
                raise RouteheadError(f"{self.path}: shards present but meta.json is missing; refusing to guess")
            meta = {"settings": self.settings, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "layout": LAYOUT}
            data = json.dumps(meta, indent=2, sort_keys=True).encode("utf-8")
            if self._atomic_write(meta_file, data, exclusive=True):
                return
            # another process created the store at the same moment: check its settings below
        if meta_file.is_file():
            try:
                meta = json.loads(meta_file.read_text(encoding="utf-8"))
                stored = _canonical(meta["settings"])
            except (ValueError, KeyError, TypeError) as exc:
                raise RouteheadError(f"{meta_file}: unreadable store metadata ({exc})") from None
            if stored != canonical:
                raise RouteheadError(
                    f"{meta_file}: stored settings differ from the requested ones "
                    f"(stored {stored}, requested {canonical}); refusing to mix results"
                )

    def _shard_files(self) -> list[Path]:
        if not self.path.is_dir():
            return []
        shards = [p for p in self.path.iterdir() if _SHARD_RE.match(p.name)]
        return sorted(shards, key=lambda p: int(_SHARD_RE.match(p.name).group(1)))

    def _atomic_write(self, target: Path, data: bytes | None, exclusive: bool, writer=None) -> bool:
        """Write a temp file then move it into place; with ``exclusive`` never replace an existing file.

        Returns False when ``exclusive`` and ``target`` already exists (another writer won the name).
        """
        fd, tmp = tempfile.mkstemp(dir=self.path, prefix=f".{target.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as fh:
                if writer is not None:
                    writer(fh)
                else:
                    fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            if not exclusive:
                os.replace(tmp, target)
                return True
            try:
                os.link(tmp, target)  # atomic and fails if the name is taken
            except FileExistsError:
                return False
            except OSError:  # file system without hard links: fall back to a checked rename
                if target.exists():
                    return False
                os.replace(tmp, target)
                return True
            return True
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    # ---------------------------------------------------------------- reading
    def _read_shard(self, path: Path, arrays: bool) -> dict:
        try:
            with np.load(path, allow_pickle=False) as z:
                missing = [k for k in _KEYS if k not in z.files]
                if missing:
                    raise RouteheadError(f"{path}: corrupt store shard (missing arrays {missing})")
                keys = _KEYS if arrays else ("qids", "counts", "shape")
                data = {k: z[k] for k in keys}
                if arrays and all(k in z.files for k in _TOKEN_KEYS):
                    data.update({k: z[k] for k in _TOKEN_KEYS + ((_CHUNK_KEY,) if _CHUNK_KEY in z.files else ())})
                if arrays and "raw_sum" in z.files:
                    data["raw_sum"] = z["raw_sum"]
        except RouteheadError:
            raise
        except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zipfile.LargeZipFile, zlib.error) as exc:
            raise RouteheadError(f"{path}: corrupt or unreadable store shard ({exc})") from None
        qids, counts, shape = data["qids"], data["counts"], data["shape"]
        if qids.ndim != 1 or counts.shape != qids.shape or shape.shape != (2,) or qids.dtype.kind != "U":
            raise RouteheadError(f"{path}: corrupt store shard (inconsistent index arrays)")
        if arrays:
            total = int(counts.sum())
            want = (int(shape[0]), int(shape[1]), total)
            for k in ("calibrated", "raw", "raw_sum")[:3 if "raw_sum" in data else 2]:
                if data[k].shape != want or data[k].dtype != np.float32:
                    raise RouteheadError(f"{path}: corrupt store shard ({k} has shape {data[k].shape}, want {want})")
            if data["doc_ids"].shape != (total,) or data["doc_ids"].dtype.kind != "U":
                raise RouteheadError(f"{path}: corrupt store shard (doc id array does not match counts)")
            if "tok_rows" in data:
                t = int(data["tok_counts"].sum())
                spans = int(data[_CHUNK_KEY].sum()) if _CHUNK_KEY in data else total
                ok = (data["tok_counts"].shape == (spans,) and data["positions"].shape == (total,)
                      and data.get(_CHUNK_KEY, data["positions"]).shape == (total,)
                      and data["tok_rows"].shape == (len(data["tok_heads"]), t) and data["tok_total"].shape == (t,)
                      and data["tok_scale"].shape == (len(qids), len(data["tok_heads"])))
                if not ok:
                    raise RouteheadError(f"{path}: corrupt store shard (token arrays do not match counts)")
        self._check_shape((int(shape[0]), int(shape[1])), str(path))
        return data

    def _check_shape(self, lh: tuple[int, int], where: str) -> None:
        if self._shape is None:
            self._shape = lh
        elif lh != self._shape:
            raise RouteheadError(
                f"{where}: [layer, head] shape {list(lh)} differs from the store's {list(self._shape)}"
            )

    def _refresh(self) -> None:
        for path in self._shard_files():
            if path.name not in self._shard_qids:
                self._shard_qids[path.name] = self._read_shard(path, arrays=False)["qids"].tolist()

    def done(self) -> set[str]:
        """Query ids already in the store: flushed by any process, or buffered here."""
        self._refresh()
        out: set[str] = set(self._buffer)
        for qids in self._shard_qids.values():
            out.update(qids)
        return out

    def load(self) -> dict[str, Entry]:
        """All stored entries (flushed shards in order, then this process's buffer).

        A query stored twice (possible only when processes overlap) keeps its last-flushed entry.
        """
        out: dict[str, Entry] = {}
        for path in self._shard_files():
            data = self._read_shard(path, arrays=True)
            self._shard_qids[path.name] = data["qids"].tolist()
            bounds = np.concatenate([[0], np.cumsum(data["counts"])]).astype(np.int64)
            doc_ids = data["doc_ids"].tolist()
            if "tok_rows" in data:
                tb = np.concatenate([[0], np.cumsum(data["tok_counts"])]).astype(np.int64)
                chunked = _CHUNK_KEY in data
                # passage (span) bounds: one per document, or each document's chunks
                pb = (np.concatenate([[0], np.cumsum(data[_CHUNK_KEY])]).astype(np.int64) if chunked
                      else np.arange(len(doc_ids) + 1))
            for i, qid in enumerate(data["qids"].tolist()):
                lo, hi = int(bounds[i]), int(bounds[i + 1])
                tokens = None
                if "tok_rows" in data:
                    plo, phi = int(pb[lo]), int(pb[hi])
                    a, b = int(tb[plo]), int(tb[phi])
                    tokens = Tokens(data["tok_heads"], data["tok_rows"][:, a:b], data["tok_scale"][i],
                                    data["tok_counts"][plo:phi], data["tok_total"][a:b], data["positions"][lo:hi],
                                    data[_CHUNK_KEY][lo:hi] if chunked else None)
                out[qid] = Entry(doc_ids[lo:hi], data["calibrated"][:, :, lo:hi], data["raw"][:, :, lo:hi], tokens,
                                 data["raw_sum"][:, :, lo:hi] if "raw_sum" in data else None)
        out.update(self._buffer)
        return out

    def __len__(self) -> int:
        return len(self.done())

    # ---------------------------------------------------------------- writing
    def add(self, qid: str, doc_ids: list[str], calibrated: np.ndarray, raw: np.ndarray,
            tokens: Tokens | None = None, raw_sum: np.ndarray | None = None) -> None:
        """Buffer one query's scores (arrays ``[layer, head, doc]``, stored as float32; ``tokens`` and
        ``raw_sum`` optional)."""
        if not isinstance(qid, str) or not qid:
            raise RouteheadError(f"query id must be a non-empty string, got {qid!r}")
        if qid in self._buffer or qid in self.done():
            raise RouteheadError(f"query {qid!r} is already in the store {self.path}")
        doc_ids = [str(d) for d in doc_ids]
        if len(set(doc_ids)) != len(doc_ids):
            raise RouteheadError(f"query {qid!r}: duplicate document ids")
        arrays = []
        for name, arr in (("calibrated", calibrated), ("raw", raw), ("raw_sum", raw_sum)):
            if arr is None:
                continue
            a = np.asarray(arr)
            if a.ndim != 3 or a.shape[2] != len(doc_ids):
                raise RouteheadError(
                    f"query {qid!r}: {name} must have shape [layer, head, {len(doc_ids)}], got {list(a.shape)}"
                )
            arrays.append(np.array(a, dtype=np.float32, copy=True))
        if any(a.shape != arrays[0].shape for a in arrays):
            raise RouteheadError(f"query {qid!r}: the per-head arrays' shapes {[list(a.shape) for a in arrays]} differ")
        self._check_shape(arrays[0].shape[:2], f"query {qid!r}")
        if tokens is not None:
            spans = len(doc_ids) if tokens.chunks is None else int(tokens.chunks.sum())
            if (len(tokens.counts) != spans or len(tokens.positions) != len(doc_ids)
                    or (tokens.chunks is not None and len(tokens.chunks) != len(doc_ids))
                    or tokens.rows.shape[1] != int(tokens.counts.sum())):
                raise RouteheadError(f"query {qid!r}: token scores do not match its {len(doc_ids)} documents")
        self._buffer[qid] = Entry(doc_ids, arrays[0], arrays[1], tokens, arrays[2] if len(arrays) > 2 else None)
        if len(self._buffer) >= self.auto_flush_every:
            self.flush()

    def flush(self) -> Path | None:
        """Write the buffered entries as a new shard; returns its path (None when nothing was buffered)."""
        if not self._buffer:
            return None
        entries = list(self._buffer.items())
        doc_ids = [d for _, e in entries for d in e.doc_ids]
        layers, heads = entries[0][1].calibrated.shape[:2]
        payload = {
            "qids": np.array([q for q, _ in entries], dtype=str),
            "counts": np.array([len(e.doc_ids) for _, e in entries], dtype=np.int64),
            # dtype "<U1" for an all-empty list keeps the array unicode (never object / pickle)
            "doc_ids": np.array(doc_ids, dtype=str) if doc_ids else np.zeros(0, dtype="<U1"),
            "calibrated": np.concatenate([e.calibrated for _, e in entries], axis=2),
            "raw": np.concatenate([e.raw for _, e in entries], axis=2),
            "shape": np.array([layers, heads], dtype=np.int64),
        }
        with_sums = [e.raw_sum is not None for _, e in entries]
        if any(with_sums):
            if not all(with_sums):
                raise RouteheadError("entries with and without raw sums cannot share a store")
            payload["raw_sum"] = np.concatenate([e.raw_sum for _, e in entries], axis=2)
        with_tokens = [e.tokens is not None for _, e in entries]
        if any(with_tokens):
            if not all(with_tokens):
                raise RouteheadError("entries with and without token scores cannot share a store")
            toks = [e.tokens for _, e in entries]
            if any(not np.array_equal(t.heads, toks[0].heads) for t in toks):
                raise RouteheadError("entries of one store must keep token scores of the same heads")
            payload.update({"tok_heads": toks[0].heads, "tok_rows": np.concatenate([t.rows for t in toks], axis=1),
                            "tok_scale": np.stack([t.scale for t in toks]),
                            "tok_counts": np.concatenate([t.counts for t in toks]),
                            "tok_total": np.concatenate([t.total for t in toks]),
                            "positions": np.concatenate([t.positions for t in toks])})
            chunked = [t.chunks is not None for t in toks]
            if any(chunked):
                if not all(chunked):
                    raise RouteheadError("entries with and without chunks cannot share a store")
                payload[_CHUNK_KEY] = np.concatenate([t.chunks for t in toks])
        self.path.mkdir(parents=True, exist_ok=True)

        def writer(fh) -> None:
            np.savez_compressed(fh, **payload)

        existing = [int(_SHARD_RE.match(p.name).group(1)) for p in self._shard_files()]
        index = max(existing, default=-1) + 1
        while True:
            target = self.path / f"shard-{index:05d}.npz"
            if self._atomic_write(target, None, exclusive=True, writer=writer):
                break
            index += 1  # another process took this name meanwhile
        self._shard_qids[target.name] = payload["qids"].tolist()
        self._buffer.clear()
        return target

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info) -> None:
        self.flush()
