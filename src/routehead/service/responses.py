"""The response bodies: Cohere v1/v2 and Jina (one shape, with Infinity's ``usage.prompt_tokens``), TEI's bare
list, and the model list of OpenAI's ``/v1/models`` and Infinity's ``/models``.

Each is the ``response_model`` of its route, so ``/openapi.json`` promises what is sent; the re-rank handlers
validate their bodies against them before sending.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field


class EvidenceItem(BaseModel):
    """A word of the document and the share of the document's score it carried."""

    text: str
    share: float


class ResultDocument(BaseModel):
    """The document echoed back with ``return_documents``."""

    text: str


class RerankResult(BaseModel):
    """One ranked document: its position in the request's ``documents`` and its score."""

    index: int
    relevance_score: float = Field(ge=0, le=1, description="Calibrated relevance in [0, 1]; see meta.calibrated.")
    document: ResultDocument | None = Field(default=None, description="Only with return_documents.")
    raw_score: float | None = Field(default=None, description="Raw attention score; only with raw_scores.")
    evidence: list[EvidenceItem] | None = Field(default=None, description="Only with return_evidence.")


class ApiVersion(BaseModel):
    version: str = "2"
    is_experimental: bool = False


class BilledUnits(BaseModel):
    search_units: int
    input_tokens: int


class Tokens(BaseModel):
    input_tokens: int


class RerankMeta(BaseModel):
    """Cohere's ``meta`` plus routehead's: whether scores are calibrated and where the time went."""

    api_version: ApiVersion = Field(default_factory=ApiVersion)
    billed_units: BilledUnits
    tokens: Tokens
    calibrated: bool = Field(description="False when no fitted calibration matches the served model: "
                             "relevance_score is then a fixed logistic of the raw score.")
    duration_ms: float
    queue_ms: float
    inference_ms: float
    batch_size: int
    n_documents: int
    warnings: list[str] | None = None


class Usage(BaseModel):
    """Jina's usage block (``total_tokens``) and Infinity's (``prompt_tokens`` too): the same count."""

    total_tokens: int
    prompt_tokens: int


class RerankResponse(BaseModel):
    """Response of the Cohere/Jina-shaped endpoints."""

    id: str
    results: list[RerankResult]
    model: str
    meta: RerankMeta
    usage: Usage
    heads: list[list[int]] | None = Field(default=None, description="Only with return_heads (null when the "
                                          "method routes nothing, e.g. icr).")
    head_weights: list[float] | None = Field(default=None, description="Only with return_heads, for routers.")


class TEIResult(BaseModel):
    """One item of TEI's bare-list response, best first."""

    index: int
    score: float
    text: str | None = Field(default=None, description="Only with return_text.")
    evidence: list[EvidenceItem] | None = Field(default=None, description="Only with return_evidence.")


class ModelStats(BaseModel):
    """Infinity's per-model queue statistics, from the service's queue."""

    queue_fraction: float = Field(description="Admitted requests over max_concurrent_requests.")
    queue_absolute: int = Field(description="Requests waiting for a replica.")
    results_pending: int = Field(description="Admitted requests (queued or running).")
    batch_size: int = Field(description="max_batch_requests: requests per model call at most.")


class ModelCard(BaseModel):
    """One served model: OpenAI's fields and Infinity's (``stats``, ``backend``, ``capabilities``)."""

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str | None = Field(default=None, description="routehead; absent on GET /models, where Infinity's "
                                 "client admits only its own name.")
    stats: ModelStats
    backend: str = "routehead"
    capabilities: list[str] = Field(default_factory=lambda: ["rerank"])


class ModelList(BaseModel):
    """``GET /v1/models`` (OpenAI) and ``GET /models`` (Infinity)."""

    object: Literal["list"] = "list"
    data: list[ModelCard]
