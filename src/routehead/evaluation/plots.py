"""Head maps: which heads do the work (per-head nDCG@10) and which the router picks, as PNG heatmaps."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def heatmap(values: np.ndarray, title: str, path: Path, label: str, cmap: str = "viridis",
            symmetric: bool = False) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    L, H = values.shape
    fig, ax = plt.subplots(figsize=(max(4.0, 0.45 * H + 2), max(4.0, 0.22 * L + 1.5)))
    lim = float(np.nanmax(np.abs(values))) if symmetric else None
    im = ax.imshow(values, aspect="auto", cmap=cmap, origin="lower", vmin=-lim if lim else None, vmax=lim)
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_xticks(range(H))
    ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=ax, label=label)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def head_maps(sc: Any, scorer: Any, out_dir: str | Path, router_path: str | Path | None = None) -> list[Path]:
    """Per-head nDCG@10 over the stored queries, each head's correlation with prompt position (position heads
    show up as strong red or blue) and, with a router, how often it routes each head."""
    from routehead.evaluation.analysis import position_correlation
    from routehead.offline.views import query_embeddings
    from routehead.selection.router import load_router
    from routehead.training.detect import detect_heads

    out = Path(out_dir)
    tag = f"{sc.collection.name}-{sc.collection.split}-{scorer.lm.name}".replace("/", "_")
    _, quality = detect_heads(sc)
    paths = [heatmap(quality, f"per-head nDCG@10 alone: {sc.collection.name} {sc.collection.split} "
                     f"({len(sc.entries)} queries, {scorer.lm.name})", out / f"heads-ndcg-{tag}.png", "nDCG@10"),
             heatmap(position_correlation(sc), f"per-head Spearman corr. with prompt position: {sc.collection.name} "
                     f"{sc.collection.split} ({sc.settings.get('doc_order')} order)",
                     out / f"heads-position-{tag}.png", "corr. (+: favours late = near the query)", "coolwarm",
                     symmetric=True)]
    if router_path is not None:
        router = load_router(router_path, scorer.lm.identity())
        cfg = router.config
        emb = query_embeddings(sc, scorer, cfg.embed_layer, cfg.pooling)
        counts = np.zeros((cfg.num_layers, cfg.num_heads))
        for qid in sorted(sc.entries):
            for lay, h in router.route(emb[qid]).heads:
                counts[lay, h] += 1
        share = counts / max(len(sc.entries), 1)
        paths.append(heatmap(share, f"router picks: {sc.collection.name} {sc.collection.split} ({scorer.lm.name})",
                             out / f"router-picks-{tag}.png", "share of queries"))
    return paths
