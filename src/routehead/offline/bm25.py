"""First-stage retrieval: BM25 (``bm25s``, Lucene variant, Snowball stemming) or a shipped pool.

The re-rankers only reorder a short candidate list, so the first stage fixes what they can reach.
Collections that ship a candidate pool (``candidates.tsv``, e.g. TREC DL) use it as is, so numbers are
comparable with published re-ranking results; the others get BM25 over ``title. text``.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from routehead.errors import RouteheadError
from routehead.offline.data import Collection, doc_text

__all__ = ["BM25", "first_stage"]

Results = dict[str, list[tuple[str, float]]]


class BM25:
    """A BM25 index over a corpus (``doc_id -> {"title", "text"}``) or a :class:`Collection`.

    Defaults are those of ``bm25s`` (Lucene BM25, k1=1.5, b=0.75) with its English stopword list and
    the PyStemmer Snowball English stemmer (``stemmer=None`` disables stemming). Scoring is a sparse
    matrix product over all queries at once, and results are exact and deterministic: documents are
    ordered by score, equal scores by doc id. Documents sharing no term with the query are not
    returned, so a list can be shorter than ``k`` (as with Lucene/Pyserini).
    """

    def __init__(
        self,
        corpus: Mapping[str, dict] | Collection,
        stemmer: str | None = "english",
        stopwords: str | list[str] | None = "en",
        k1: float = 1.5,
        b: float = 0.75,
        method: str = "lucene",
    ) -> None:
        import bm25s

        docs = corpus.corpus if isinstance(corpus, Collection) else corpus
        if not docs:
            raise RouteheadError("BM25: the corpus is empty")
        self.doc_ids: list[str] = list(docs)
        self._stemmer = None
        if stemmer:
            try:
                import Stemmer
            except ImportError as exc:  # pragma: no cover - PyStemmer is a hard dependency
                raise RouteheadError("BM25 stemming needs PyStemmer: pip install PyStemmer") from exc
            try:
                self._stemmer = Stemmer.Stemmer(stemmer)
            except KeyError:
                raise RouteheadError(
                    f"unknown stemmer language {stemmer!r}; choose one of {Stemmer.algorithms()}"
                ) from None
        self._stopwords = stopwords if stopwords else []
        tokens = bm25s.tokenize(
            [doc_text(docs[d]) for d in self.doc_ids],
            stopwords=self._stopwords,
            stemmer=self._stemmer,
            show_progress=False,
        )
        self._vocab: dict[str, int] = dict(tokens.vocab)
        self._retriever = bm25s.BM25(k1=k1, b=b, method=method)
        self._retriever.index(tokens, show_progress=False)
        self._matrix = self._term_doc_matrix()
        # rank of each document in doc-id order, for deterministic tie-breaking
        order = np.argsort(np.array(self.doc_ids, dtype=str), kind="stable")
        self._id_rank = np.empty(len(order), dtype=np.int64)
        self._id_rank[order] = np.arange(len(order))

    def _term_doc_matrix(self):
        """bm25s stores precomputed term-document scores per term (CSC by term = CSR over terms)."""
        import scipy.sparse as sp

        s = self._retriever.scores
        n_terms = len(s["indptr"]) - 1
        return sp.csr_matrix((s["data"], s["indices"], s["indptr"]), shape=(n_terms, s["num_docs"]))

    def _query_matrix(self, texts: list[str]):
        import bm25s
        import scipy.sparse as sp

        tokenized = bm25s.tokenize(
            texts, stopwords=self._stopwords, stemmer=self._stemmer, return_ids=False, show_progress=False
        )
        rows, cols = [], []
        for i, toks in enumerate(tokenized):
            for t in toks:
                tid = self._vocab.get(t)
                if tid is not None:
                    rows.append(i)
                    cols.append(tid)
        data = np.ones(len(rows), dtype=self._matrix.dtype)  # repeated terms add up (as in bm25s)
        return sp.csr_matrix((data, (rows, cols)), shape=(len(texts), self._matrix.shape[0]))

    def search(self, queries: Mapping[str, str], k: int, batch_size: int = 1024) -> Results:
        """Top-``k`` documents per query: ``{query_id: [(doc_id, score), ...]}``, best first."""
        if k < 1:
            raise RouteheadError(f"k must be >= 1, got {k}")
        qids = list(queries)
        out: Results = {}
        for start in range(0, len(qids), batch_size):
            chunk = qids[start : start + batch_size]
            scores = (self._query_matrix([queries[q] for q in chunk]) @ self._matrix).tocsr()
            scores.sum_duplicates()
            for row, qid in enumerate(chunk):
                lo, hi = scores.indptr[row], scores.indptr[row + 1]
                out[qid] = self._top_k(scores.indices[lo:hi], scores.data[lo:hi], k)
        return out

    def _top_k(self, idx: np.ndarray, val: np.ndarray, k: int) -> list[tuple[str, float]]:
        keep = val > 0
        idx, val = idx[keep], val[keep]
        if len(val) > k:
            kth = np.partition(val, len(val) - k)[len(val) - k]  # k-th largest score
            keep = val >= kth  # keeps every document tied at the cut, then orders them by id
            idx, val = idx[keep], val[keep]
        order = np.lexsort((self._id_rank[idx], -val))[:k]
        return [(self.doc_ids[i], float(val[j])) for j, i in zip(order, idx[order])]


def first_stage(collection: Collection, k: int, bm25: BM25 | None = None) -> Results:
    """The candidates to re-rank: the shipped pool when the collection has one, else BM25 top-``k``.

    Pool entries keep their file order and score (``-rank`` when no score is known). Every judged query
    gets an entry, possibly an empty list. Pass a prebuilt ``bm25`` to reuse an index.
    """
    if k < 1:
        raise RouteheadError(f"k must be >= 1, got {k}")
    if collection.candidates is not None:
        out: Results = {}
        for qid in collection.queries:
            docs = collection.candidates.get(qid, [])[:k]
            file_scores = (collection.candidate_scores or {}).get(qid)
            if file_scores is not None and len(file_scores) >= len(docs):
                out[qid] = [(d, float(s)) for d, s in zip(docs, file_scores)]
            else:
                out[qid] = [(d, -float(r)) for r, d in enumerate(docs, 1)]
        return out
    index = bm25 if bm25 is not None else BM25(collection)
    results = index.search(collection.queries, k)
    return {qid: results.get(qid, []) for qid in collection.queries}
