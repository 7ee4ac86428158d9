"""README's integration snippets: each is an examples/integrations file, shown verbatim in README and run here
end to end on the default model (the Ray snippet runs in tests/integrations/test_ray.py, beside its local Ray)."""

from __future__ import annotations

import os
import runpy
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SNIPPETS = sorted((ROOT / "examples" / "integrations").glob("*.py"))
FRAMEWORK = {"langchain_compressor": "langchain_core", "llamaindex_postprocessor": "llama_index.core",
             "haystack_ranker": "haystack", "rerankers_ranker": "rerankers", "ray_rerank": "ray.data"}


def shipped_router_problem() -> str | None:
    """Why the router shipped for the default model cannot be loaded (e.g. made by an older routehead), or None."""
    from routehead.assets import default_router_path
    from routehead.engine.model import DEFAULT_MODEL
    from routehead.errors import RouteheadError
    from routehead.selection.router import load_router

    try:
        load_router(default_router_path(DEFAULT_MODEL))
    except RouteheadError as exc:
        return str(exc)
    return None


def share_default_model(monkeypatch, default_lm, tmp_path) -> bool:
    """Snippets build their own Reranker; hand them the session's default model instead of loading it again.

    Where the shipped router cannot be loaded, an untrained router over every head stands in for it, so the
    snippet still runs RouteHead end to end (its ranking then means nothing). Returns whether the shipped one runs.
    """
    import routehead.api
    from routehead.engine.model import DEFAULT_MODEL

    real = routehead.api.load_model

    def load(model=None, **kwargs):
        return default_lm if model in (None, DEFAULT_MODEL) else real(model, **kwargs)

    monkeypatch.setattr(routehead.api, "load_model", load)
    if shipped_router_problem() is None:
        return True
    from routehead.selection.router import Router, RouterConfig

    pool = [[a, b] for a in range(default_lm.num_layers) for b in range(default_lm.num_heads)]
    Router(RouterConfig(identity=default_lm.identity(), embed_layer=8, pool=pool, threshold=0.0, max_heads=4)
           ).save(tmp_path / "router.safetensors")
    monkeypatch.setattr(routehead.api, "default_router_path", lambda name: tmp_path / "router.safetensors")
    return False


def snippet_block(path: Path) -> str:
    return f"<!-- snippet: examples/integrations/{path.name} -->\n```python\n{path.read_text().rstrip()}\n```"


def test_every_snippet_is_in_the_readme_verbatim():
    readme = (ROOT / "README.md").read_text()
    assert {p.stem for p in SNIPPETS} == set(FRAMEWORK)
    for path in SNIPPETS:
        assert snippet_block(path) in readme, f"README's copy of {path.name} differs from the file"


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(set(FRAMEWORK) - {"ray_rerank"}))
def test_snippet_runs_on_the_default_model(name, capsys, monkeypatch, default_lm, tmp_path):
    os.environ.setdefault("HAYSTACK_TELEMETRY_ENABLED", "False")
    pytest.importorskip(FRAMEWORK[name])
    trained = share_default_model(monkeypatch, default_lm, tmp_path)
    runpy.run_path(str(ROOT / "examples" / "integrations" / f"{name}.py"), run_name="__main__")
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and all("[[" in line for line in lines), lines  # top 2 kept, routed heads printed
    if trained:
        assert "Jupiter" not in " ".join(lines), lines  # the two relevant documents kept, the distractor dropped
