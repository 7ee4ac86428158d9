"""From a raw attention score to a ``relevance_score`` in [0, 1] that means the same thing for every query.

Why: a raw score (attention mass a document receives) is comparable across queries only roughly, and a
per-list normalisation (z-score, min-max) is not comparable at all: the best document of an irrelevant list
would always get 1.0.  A service user wants "keep documents above 0.5" to mean "probably relevant" whatever
the query.  So the map is fitted on judged ``(query, document, grade)`` triples: a logistic regression of
"grade >= relevant_grade" on the raw score and, optionally, per-list features of it (its z within the list,
its rank).  Every coefficient is kept >= 0 (a feature that wants a negative weight is dropped and the rest
refitted), so within a list the map is monotone in the raw score: calibration never reorders a ranking.

A :class:`Calibration` is a small JSON asset keyed by model + method + settings (``calibration-<model>-<method>
.json`` next to the router); :func:`find_calibration` returns the one whose key matches a reranker's
``info()``, and :func:`fallback` is the clearly-labelled stand-in when none matches: the logistic of the raw
score at a fixed scale, flagged ``calibrated=False`` (the service says so in every response's ``meta``).
Its numbers are monotone and in [0, 1] but carry no probability meaning.

:func:`reliability` measures how well probabilities match observed relevance: expected calibration error
(ECE, equal-width bins, weighted by count) and the per-bin table behind a reliability diagram.
"""

from __future__ import annotations

import importlib.resources
import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

FEATURES = ("raw", "z", "rank")
FORMAT = "routehead-calibration-v1"
FALLBACK_SCALE = 1.0


def list_features(scores: Sequence[float] | np.ndarray, names: Sequence[str] = FEATURES) -> np.ndarray:
    """Features of each score of one list, ``(n, len(names))``; each one non-decreasing in the raw score.

    ``raw``: the score itself.  ``z``: its z within the list (0 for a single document or a constant list).
    ``rank``: ``-log(1 + rank)`` with rank 0 for the best (ties share the better rank), so higher is better.
    """
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    cols = []
    for name in names:
        if name == "raw":
            cols.append(s)
        elif name == "z":
            sd = s.std()
            cols.append((s - s.mean()) / sd if s.size > 1 and sd > 0 else np.zeros_like(s))
        elif name == "rank":
            # number of strictly better scores: ties get the same (better) rank, so the feature stays monotone
            better = np.sum(s[None, :] > s[:, None], axis=1)
            cols.append(-np.log1p(better.astype(np.float64)))
        else:
            raise ValueError(f"unknown calibration feature {name!r}; use some of {FEATURES}")
    return np.stack(cols, axis=1) if cols else np.zeros((s.size, 0))


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))  # no overflow warnings for large |x|


@dataclass
class Calibration:
    """A fitted monotone map; ``key`` says which model/method/settings its raw scores came from."""

    key: dict[str, Any]
    features: list[str]
    coef: list[float]
    intercept: float
    calibrated: bool = True
    relevant_grade: float = 1.0
    fitted_on: str | None = None
    reliability: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def relevance(self, scores: Sequence[float] | np.ndarray) -> np.ndarray:
        """``relevance_score`` of each raw score of *one list* (the per-list features need the whole list)."""
        s = np.asarray(scores, dtype=np.float64).reshape(-1)
        if s.size == 0:
            return s
        x = list_features(s, self.features)
        return _sigmoid(x @ np.asarray(self.coef, dtype=np.float64) + self.intercept)

    def matches(self, info: Mapping[str, Any]) -> bool:
        """Whether this calibration was fitted for the reranker described by ``info``.

        ``model`` and ``method`` must be equal; every setting in the key must be present in ``info`` and equal
        (a setting the reranker does not report is a mismatch, not a wildcard). ``max_chunks_per_doc`` must be
        equal too, absent meaning 1: chunked documents score by their best chunk, another score distribution
        than the truncated documents a calibration without it was fitted on.
        """
        for name in ("model", "method"):
            if self.key.get(name) != info.get(name):
                return False
        settings = self.key.get("settings", {})
        if _jsonable(info.get("max_chunks_per_doc", 1)) != settings.get("max_chunks_per_doc", 1):
            return False
        return all(name in info and _jsonable(info[name]) == value for name, value in settings.items())

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, **asdict(self)}

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.to_dict(), indent=1) + "\n", encoding="utf-8")
        return path

    @classmethod
    def from_dict(cls, body: Mapping[str, Any]) -> Calibration:
        if body.get("format") != FORMAT:
            raise ValueError(f"not a routehead calibration (format {body.get('format')!r}, expected {FORMAT!r})")
        fields_ = {k: v for k, v in body.items() if k != "format"}
        cal = cls(**fields_)
        if len(cal.coef) != len(cal.features):
            raise ValueError("calibration has a different number of coefficients and features")
        if any(c < 0 for c in cal.coef):
            raise ValueError("calibration coefficients must be >= 0 (the map must be monotone)")
        return cal

    @classmethod
    def load(cls, path: str | Path) -> Calibration:
        return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def calibration_key(info: Mapping[str, Any],
                    settings: Sequence[str] = ("doc_order", "router", "heads")) -> dict[str, Any]:
    """The key a calibration fitted for the reranker described by ``info`` is stored under: the prompt order
    (scores of another order have another scale) and the method's asset, the router (its fingerprint among its
    settings) or the head set, so a calibration fitted on one router's or head set's scores never serves
    another's."""
    return {"model": info.get("model"), "method": info.get("method"),
            "settings": {name: _jsonable(info[name]) for name in settings if name in info}}


def fallback(info: Mapping[str, Any] | None = None, scale: float = FALLBACK_SCALE) -> Calibration:
    """The stand-in used when no fitted calibration matches: ``sigmoid(raw / scale)``, flagged uncalibrated."""
    key = calibration_key(info or {})
    return Calibration(key=key, features=["raw"], coef=[1.0 / scale], intercept=0.0, calibrated=False,
                       extra={"note": f"fallback: logistic of the raw score at a fixed scale ({scale}); "
                                      "monotone and in [0, 1] but not a probability of relevance"})


def fit_calibration(raw: Sequence[float] | np.ndarray, groups: Sequence[Any] | np.ndarray,
                    grades: Sequence[float] | np.ndarray, *, features: Sequence[str] = ("raw",),
                    relevant_grade: float = 1.0, l2: float = 1e-2, key: dict[str, Any] | None = None,
                    fitted_on: str | None = None, max_iter: int = 100) -> Calibration:
    """Fit the map on flat arrays: one row per judged (query, document), ``groups`` naming the row's list.

    ``grades >= relevant_grade`` is the positive class.  The per-list features are computed within each
    group, exactly as :meth:`Calibration.relevance` computes them on one response's list.  Logistic regression
    by Newton's method on standardised features with an L2 penalty ``l2`` (not on the intercept); a feature
    whose weight comes out negative is dropped and the rest refitted, so the result is monotone.
    """
    raw = np.asarray(raw, dtype=np.float64).reshape(-1)
    groups = np.asarray(groups).reshape(-1)
    y = (np.asarray(grades, dtype=np.float64).reshape(-1) >= relevant_grade).astype(np.float64)
    if not (raw.size == groups.size == y.size) or raw.size == 0:
        raise ValueError("raw, groups and grades must be non-empty and of one length")
    if y.min() == y.max():
        raise ValueError("calibration needs both relevant and non-relevant judgments")
    names = list(features)
    X = np.zeros((raw.size, len(names)))
    for g in np.unique(groups):
        rows = np.flatnonzero(groups == g)
        X[rows] = list_features(raw[rows], names)
    active = list(range(len(names)))
    while True:
        coef_std, b, mu, sd = _logistic(X[:, active], y, l2, max_iter)
        if all(c >= 0 for c in coef_std) or len(active) == 1:
            break
        active = [a for a, c in zip(active, coef_std) if c >= 0] or active[:1]
    coef_std = np.maximum(coef_std, 0.0)
    coef = coef_std / sd
    intercept = float(b - np.sum(coef_std * mu / sd))
    full = [0.0] * len(names)
    for a, c in zip(active, coef):
        full[a] = float(c)
    kept = [n for n, c in zip(names, full) if c > 0] or names[:1]
    cal = Calibration(key=key or {}, features=kept, coef=[full[names.index(n)] for n in kept], intercept=intercept,
                      relevant_grade=relevant_grade, fitted_on=fitted_on)
    prob = np.zeros(raw.size)
    for g in np.unique(groups):
        rows = np.flatnonzero(groups == g)
        prob[rows] = cal.relevance(raw[rows])
    cal.reliability = {"on": "fit data", **reliability(prob, y)}
    return cal


def _logistic(X: np.ndarray, y: np.ndarray, l2: float, max_iter: int
              ) -> tuple[np.ndarray, float, np.ndarray, np.ndarray]:
    mu = X.mean(0)
    sd = X.std(0)
    sd = np.where(sd > 0, sd, 1.0)
    Z = np.hstack([(X - mu) / sd, np.ones((X.shape[0], 1))])
    w = np.zeros(Z.shape[1])
    reg = np.full(Z.shape[1], l2 * X.shape[0])
    reg[-1] = 0.0
    for _ in range(max_iter):
        p = _sigmoid(Z @ w)
        grad = Z.T @ (p - y) + reg * w
        hess = (Z * (p * (1 - p))[:, None]).T @ Z + np.diag(reg) + 1e-9 * np.eye(Z.shape[1])
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.max(np.abs(step)) < 1e-10:
            break
    return w[:-1], float(w[-1]), mu, sd


def reliability(prob: Sequence[float] | np.ndarray, relevant: Sequence[float] | np.ndarray, bins: int = 10
                ) -> dict[str, Any]:
    """Expected calibration error and the reliability table (equal-width bins over [0, 1]).

    ``ece`` = sum over bins of (bin count / total) * |mean predicted - observed rate|; empty bins are listed
    with count 0 and no means.
    """
    p = np.asarray(prob, dtype=np.float64).reshape(-1)
    y = np.asarray(relevant, dtype=np.float64).reshape(-1)
    if p.size != y.size or p.size == 0:
        raise ValueError("prob and relevant must be non-empty and of one length")
    idx = np.minimum((p * bins).astype(int), bins - 1)
    table, ece = [], 0.0
    for b in range(bins):
        mask = idx == b
        n = int(mask.sum())
        row: dict[str, Any] = {"lo": b / bins, "hi": (b + 1) / bins, "count": n}
        if n:
            mean_p, rate = float(p[mask].mean()), float(y[mask].mean())
            row.update(mean_predicted=mean_p, observed=rate)
            ece += n / p.size * abs(mean_p - rate)
        table.append(row)
    brier = float(np.mean((p - y) ** 2))
    return {"ece": float(ece), "brier": brier, "n": int(p.size), "bins": table}


def calibration_paths(directory: str | Path | None = None) -> list[Path]:
    """Calibration assets in ``directory`` (default: the package's assets), ``calibration-*.json``."""
    if directory is None:
        directory = Path(str(importlib.resources.files("routehead").joinpath("assets")))
    directory = Path(directory)
    return sorted(directory.glob("calibration-*.json")) if directory.is_dir() else []


def find_calibration(info: Mapping[str, Any], directory: str | Path | None = None) -> Calibration | None:
    """The first shipped calibration whose key matches ``info`` (a reranker's ``info()``), or None."""
    for path in calibration_paths(directory):
        try:
            cal = Calibration.load(path)
        except (ValueError, OSError, TypeError):
            continue
        if cal.matches(info):
            return cal
    return None


def calibration_for(info: Mapping[str, Any], directory: str | Path | None = None) -> Calibration:
    """:func:`find_calibration`, else :func:`fallback` (check ``.calibrated`` to know which you got)."""
    return find_calibration(info, directory) or fallback(info)


__all__ = ["FEATURES", "Calibration", "calibration_for", "calibration_key", "fallback", "find_calibration",
           "fit_calibration", "list_features", "reliability"]
