"""A scoring job: one collection split, one model, one :class:`ScoringSettings`. Torch-free to import (the CLI
builds one without loading torch); :meth:`ScoreJob.run` loads the model and fills the store."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from routehead.errors import RouteheadError
from routehead.settings import SCORING, ScoringSettings

if TYPE_CHECKING:
    from routehead.engine.scorer import HeadScorer
    from routehead.offline.collect import ScoredCollection


@dataclass(frozen=True)
class ScoreJob:
    """One collection split scored with one model under one :class:`ScoringSettings`: what ``routehead score``
    (and ``evaluate``, ``detect``, ``train``, ...) and the Ray actors run, so every path builds the same store."""

    data: str
    split: str = "test"
    model: str | None = None
    device: str | None = None
    dtype: str | None = None
    trust_remote_code: bool = False
    max_queries: int | None = None
    scoring: ScoringSettings = field(default_factory=ScoringSettings)
    shard: tuple[int, int] = (0, 1)
    stored_only: bool = False  # no forward passes: only the queries already in the store
    progress: bool = True

    def with_options(self, **options: Any) -> ScoreJob:
        """This job with fields (or :class:`ScoringSettings` fields, or the CLI's ``no_progress``) replaced; an
        unknown name is an error."""
        if "no_progress" in options:
            options["progress"] = not options.pop("no_progress")
        own = {k: v for k, v in options.items() if k in self.__dataclass_fields__ and k != "scoring"}
        scoring = {k: v for k, v in options.items() if k in ScoringSettings.__dataclass_fields__}
        unknown = sorted(set(options) - set(own) - set(scoring))
        if unknown:
            raise RouteheadError(f"routehead score has no option --{unknown[0].replace('_', '-')} to set here")
        return replace(self, scoring=replace(self.scoring, **scoring), **own)

    def run(self, compute: bool = True, scorer: HeadScorer | None = None) -> tuple[ScoredCollection, HeadScorer]:
        """Load the collection and the model, score the missing queries of this shard (unless ``compute`` is
        False or ``stored_only``), and return everything stored with the scorer. ``scorer``: the one an earlier
        job with the same model and scoring settings returned, so that several collections load the model once."""
        from routehead.engine.model import load_model
        from routehead.engine.scorer import HeadScorer
        from routehead.offline.collect import score_collection
        from routehead.offline.data import load_collection

        coll = load_collection(self.data, self.split)
        s = self.scoring
        if scorer is None:
            lm = load_model(self.model, device=self.device, dtype=self.dtype,
                            trust_remote_code=self.trust_remote_code)
            scorer = HeadScorer(lm, max_doc_tokens=s.max_doc_tokens, retrieval_type=s.retrieval_type,
                                layout=s.layout, max_chunks_per_doc=s.max_chunks_per_doc)
        compute = compute and not self.stored_only
        sc = score_collection(coll, scorer if compute else None, scorer.settings(), top_k=s.top_k,
                              max_queries=self.max_queries, shard=self.shard[0], num_shards=self.shard[1],
                              progress=self.progress, batch_size=s.batch_size, doc_order=s.doc_order)
        if not compute:  # evaluate the stored queries only, not the rest in first-stage order
            sc.first_stage = {q: c for q, c in sc.first_stage.items() if q in sc.entries}
        return sc, scorer

    def first_stage_only(self) -> ScoredCollection:
        """The collection with its first stage and no stored pass (for baselines that read none: no model)."""
        from routehead.offline.bm25 import first_stage
        from routehead.offline.collect import ScoredCollection, select_queries
        from routehead.offline.data import load_collection

        coll = load_collection(self.data, self.split)
        qids = set(select_queries(coll, self.max_queries))
        fs = {q: c for q, c in first_stage(coll, max(SCORING.depth, self.scoring.top_k)).items() if q in qids}
        return ScoredCollection(coll, fs, {}, {"collection": coll.name, "split": coll.split,
                                               "top_k": self.scoring.top_k, "model": None})
