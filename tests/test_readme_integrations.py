"""README's integration snippets: each is an examples/integrations file, shown verbatim in README and run here
end to end on the default model (the Ray snippet runs in tests/test_ray.py, beside its local Ray)."""

from __future__ import annotations

import os
import runpy
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SNIPPETS = sorted((ROOT / "examples" / "integrations").glob("*.py"))
FRAMEWORK = {"langchain_compressor": "langchain_core", "llamaindex_postprocessor": "llama_index.core",
             "haystack_ranker": "haystack", "rerankers_ranker": "rerankers", "ray_rerank": "ray.data"}


def share_default_model(monkeypatch, default_lm) -> None:
    """Snippets build their own Reranker; hand them the session's default model instead of loading it again."""
    import routehead.api
    from routehead.model import DEFAULT_MODEL

    real = routehead.api.load_model

    def load(model=None, **kwargs):
        return default_lm if model in (None, DEFAULT_MODEL) else real(model, **kwargs)

    monkeypatch.setattr(routehead.api, "load_model", load)


def snippet_block(path: Path) -> str:
    return f"<!-- snippet: examples/integrations/{path.name} -->\n```python\n{path.read_text().rstrip()}\n```"


def test_every_snippet_is_in_the_readme_verbatim():
    readme = (ROOT / "README.md").read_text()
    assert {p.stem for p in SNIPPETS} == set(FRAMEWORK)
    for path in SNIPPETS:
        assert snippet_block(path) in readme, f"README's copy of {path.name} differs from the file"


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(set(FRAMEWORK) - {"ray_rerank"}))
def test_snippet_runs_on_the_default_model(name, capsys, monkeypatch, default_lm):
    os.environ.setdefault("HAYSTACK_TELEMETRY_ENABLED", "False")
    pytest.importorskip(FRAMEWORK[name])
    share_default_model(monkeypatch, default_lm)
    runpy.run_path(str(ROOT / "examples" / "integrations" / f"{name}.py"), run_name="__main__")
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and "Statins" in lines[0], lines  # the relevant document first, top 2 kept
    assert "[[" in lines[0]  # routed heads printed
