"""The adapters' shared Reranker (see adapters_common.tiny_reranker)."""

import pytest

from tests.integrations.adapters_common import tiny_reranker


@pytest.fixture(scope="module")
def rr(tmp_path_factory):
    """A routed Reranker on tiny_lm("llama") whose router always routes the first-stage score; one per module."""
    return tiny_reranker(tmp_path_factory.mktemp("rr"))
