"""The request bodies the service speaks (Cohere v1/v2, Jina and Infinity in one shape; TEI), routehead's
extras, and a checked ranking turned into results (the response models are in :mod:`~routehead.service.responses`).

Why one Cohere-style model for ``/v1/rerank``, ``/v2/rerank`` and ``/rerank``-with-``documents``: Cohere v1,
Cohere v2, Jina and Infinity send overlapping subsets of the same fields, and a client of one must not get 422
for a field another one defines.  So the request model is their union; fields routehead cannot act on are
accepted and documented as ignored (``priority``, ``relevant_spans``) rather than refused; ``max_chunks_per_doc``
(Cohere's) is honoured, on every shape.
Unknown fields are still refused (422 naming the allowed ones): a typo such as ``topn`` must not be silently
dropped.  Any ``model`` name is accepted (clients send ``rerank-v3.5`` or Jina's default); the response says
which model actually served.

TEI's ``/rerank`` body is told apart by ``texts`` (TEI) versus ``documents`` (everything else), and gets TEI's
bare-list response.  It takes what TEI takes, plus ``top_n`` (honoured: the best ``top_n`` come back) and the
extras; like TEI, it ignores any other field (rerankers' TEI provider sends ``model``): the handler reports the
ignored names in the ``x-ignored-fields`` header and the request's log line.

Scores: ``relevance_score`` (and TEI's ``score``) is the calibrated value in [0, 1] (see
``routehead.calibration``); ``raw_score`` (or TEI's ``score`` with ``raw_scores: true``) is the reranker's raw
attention score.  Extras, opt-in on every shape: ``return_heads`` (routed heads and their weights),
``return_evidence: k`` (the k words of each document that carried its score, with their share).

The JSON Schema of each request says what the validators check, cross-field rules included where JSON Schema
can say them (without ``rank_fields`` an object document needs ``text``, and ``max_document_chars`` caps that
``text``); the ones it cannot are in the descriptions: ``first_stage_scores`` has one score per document (also
``x-same-length-as``), and with ``rank_fields`` ``max_document_chars`` caps the text ranked (the named fields as
``field: value`` lines), whichever fields those are, while the fields not named (``text`` included) are ignored,
as Cohere ignores them, whatever their length.
"""

from __future__ import annotations

import json
import math
import operator
import sys
from collections.abc import Sequence
from decimal import Decimal
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    field_validator,
    model_validator,
)
from pydantic.json_schema import WithJsonSchema
from pydantic_core import PydanticCustomError

from routehead.calibration import Calibration
from routehead.service.errors import check_unicode, clip, is_valid_unicode, json_type

MAX_EVIDENCE = 64


def _check_document(value: object) -> object:
    """Validate one document before the schema's union does, to give one clear message per bad item."""
    if isinstance(value, str):
        check_unicode(value)
        return value
    if isinstance(value, dict):
        text = value.get("text")
        if "text" in value and not isinstance(text, str):
            raise PydanticCustomError("document_text_type", '"text" must be a string, got {got}',
                                      {"got": json_type(text)})
        if isinstance(text, str):
            check_unicode(text)
        return value
    raise PydanticCustomError("document_type", 'must be a string or an object with a "text" field, got {got}',
                              {"got": json_type(value)})


_DOCUMENT_SCHEMA = {"anyOf": [{"type": "string"}, {"type": "object", "properties": {"text": {"type": "string"}},
                                                    "additionalProperties": True}],
                    "description": 'A string, or an object with "text" (other keys allowed; with rank_fields, '
                                   'the named fields instead of "text": "text" is then optional, and ignored '
                                   'unless named). max_document_chars caps the text ranked: the string, the '
                                   'object\'s "text", or with rank_fields the named fields as "field: value" '
                                   'lines (that one no JSON Schema can state).'}
# without rank_fields (absent, null or empty), an object document needs "text", and "text" is what is ranked (its
# maxLength, max_document_chars, goes here: schema.with_limits): the validator's rule, in the schema.  With
# rank_fields, "text" is one more field, ranked only if named, so no maxLength applies to it as such.
# (if/else rather than anyOf: a generator such as schemathesis's mis-merges an anyOf nested in /rerank's anyOf)
_TEXT_UNLESS_RANK_FIELDS = {
    "if": {"properties": {"rank_fields": {"type": "array", "minItems": 1}}, "required": ["rank_fields"]},
    "else": {"properties": {"documents": {"items": {"anyOf": [
        {"type": "string"}, {"type": "object", "required": ["text"], "properties": {"text": {"type": "string"}}}]}}}},
}
Document = Annotated[StrictStr | dict[str, Any], BeforeValidator(_check_document), WithJsonSchema(_DOCUMENT_SCHEMA)]
# the schema says what the validator checks: a character that is not str.isspace() (spelled out: JSON Schema's
# regexes are ECMA's, whose \s is not Python's)
_QUERY = {"pattern": r"[^\t\n\v\f\r\x1c-\x1f \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]"}


def _integral(value: object) -> object:
    """JSON has one number type: ``2.0`` is the integer 2 (as JSON Schema says), ``2.5`` and ``"2"`` are not."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


# the bound as the schema writes it (1.7976931348623157e308), as an exact integer: the float maximum itself is a
# little larger (179769313486231570814...), so an integer between the two would pass a float comparison yet break
# the schema's ``maximum``
_INT_BOUND = int(Decimal(repr(sys.float_info.max)))


def _finite(value: float) -> float:
    """A float's range: JSON's ``1e400`` decodes to ``inf``, and an integer past it cannot become a float (integers
    are held to the schema's bound exactly, as a JSON Schema validator reads it)."""
    bound = _INT_BOUND if isinstance(value, int) else sys.float_info.max
    if not -bound <= value <= bound:
        raise PydanticCustomError("not_finite", "must be a finite number (at most {max} in magnitude)",
                                  {"max": sys.float_info.max})
    return value


# the range in the schema too: a number past it is refused (422), never a crash converting it
FiniteNumber = Annotated[StrictFloat | StrictInt, AfterValidator(_finite), WithJsonSchema(
    {"type": "number", "minimum": -sys.float_info.max, "maximum": sys.float_info.max})]
Integer = Annotated[StrictInt, BeforeValidator(_integral)]  # constraints go before the validator (else the schema
PositiveInt = Annotated[StrictInt, Field(ge=1), BeforeValidator(_integral)]  # says "ge", not "minimum")
EvidenceK = Annotated[StrictInt, Field(ge=0, le=MAX_EVIDENCE), BeforeValidator(_integral)]


def _query_not_blank(value: str) -> str:
    if not value.strip():
        raise PydanticCustomError("empty_query", "must not be empty or whitespace-only")
    check_unicode(value)
    return value


class Extras(BaseModel):
    """routehead's opt-in extras, accepted on every shape."""

    return_heads: StrictBool = Field(default=False, description="Return the routed (layer, head) pairs and "
                                     "their weights for this query.")
    return_evidence: EvidenceK = Field(default=0, description="Return, per result, the k words of the "
                                       "document that carried its score, with their share (0: off).")
    max_chunks_per_doc: PositiveInt | None = Field(
        default=None, description="Long documents: split each document longer than the served per-document cap "
        "(max_doc_tokens) into up to this many consecutive chunks of that size, each its own passage in the "
        "prompt, and score it by its best chunk (MaxP); 1: truncation to the cap. Default: the server's "
        "(routehead serve --max-chunks-per-doc, itself 1). Chunks count in max_request_tokens.")


class RerankRequest(Extras):
    """Body of ``POST /v1/rerank``, ``/v2/rerank`` and ``/rerank`` with ``documents`` (Cohere v1/v2, Jina)."""

    model_config = ConfigDict(extra="forbid", json_schema_extra=_TEXT_UNLESS_RANK_FIELDS)

    query: StrictStr = Field(description="The search query; must contain a non-whitespace character.",
                             json_schema_extra=_QUERY)
    documents: list[Document] = Field(min_length=1, description='Strings, or objects with "text" (other keys '
                                      'are allowed and ignored unless named in rank_fields).')
    model: StrictStr | None = Field(default=None, description="Accepted and ignored: any name; the response "
                                    "names the served model.")
    top_n: PositiveInt | None = Field(default=None, description="Return only the best top_n (default: all).")
    return_documents: StrictBool | None = Field(default=None, description="Echo each result's document text.")
    rank_fields: list[StrictStr] | None = Field(default=None, description="Object documents: the fields to "
                                                "rank on, joined as 'field: value' lines (default: text); a "
                                                "document with none of them is ranked as an empty text (and "
                                                "meta.warnings says so). max_document_chars caps those lines "
                                                "(422 past it); the fields not named are ignored.")
    max_tokens_per_doc: PositiveInt | None = Field(default=None, description="Cut each document to this many "
                                                   "tokens (the engine's own cap still applies).")
    priority: Integer | None = Field(default=None, description="Accepted and ignored.")
    relevant_spans: dict[str, Any] | None = Field(default=None, description="Accepted and ignored; use "
                                                  "return_evidence.")
    raw_scores: StrictBool = Field(default=False, description="Also return each result's raw attention score.")
    first_stage_scores: list[FiniteNumber] | None = Field(
        default=None, description="One first-stage score per document (as many as documents: 422 otherwise), "
        "for routers that use them.", json_schema_extra={"x-same-length-as": "documents"})

    @field_validator("query")
    @classmethod
    def _query_ok(cls, value: str) -> str:
        return _query_not_blank(value)

    @model_validator(mode="after")
    def _documents_have_text(self) -> RerankRequest:
        for i, doc in enumerate(self.documents):
            if isinstance(doc, dict) and not self.rank_fields and "text" not in doc:
                raise PydanticCustomError("document_text_missing", 'documents[{i}]: object has no "text" '
                                          'field (send "text", or name the fields in rank_fields)', {"i": i})
            if isinstance(doc, dict) and self.rank_fields and not is_valid_unicode(self._ranked(doc)):
                # a lone surrogate in a named field's name or value (\ud800 escapes are legal JSON) would
                # crash the tokenizer and the echo of the text (return_documents); "text" has _check_document
                raise PydanticCustomError("invalid_unicode", "documents[{i}]: the fields named in rank_fields "
                                          "contain invalid Unicode (a lone surrogate)", {"i": i})
        if self.first_stage_scores is not None and len(self.first_stage_scores) != len(self.documents):
            raise PydanticCustomError("first_stage_length", "first_stage_scores has {n} scores for {m} documents",
                                      {"n": len(self.first_stage_scores), "m": len(self.documents)})
        return self

    def without_rank_fields(self) -> list[int]:
        """The object documents that have none of the ``rank_fields`` (ranked as an empty text)."""
        if not self.rank_fields:
            return []
        return [i for i, doc in enumerate(self.documents)
                if isinstance(doc, dict) and not any(f in doc for f in self.rank_fields)]

    def joined(self) -> set[int]:
        """The object documents ranked on their ``rank_fields`` (as ``field: value`` lines)."""
        if not self.rank_fields:
            return set()
        return {i for i, doc in enumerate(self.documents) if isinstance(doc, dict)}

    def texts(self) -> list[str]:
        """The text the model ranks for each document."""
        out = []
        for doc in self.documents:
            if isinstance(doc, str):
                out.append(doc)
            elif self.rank_fields:
                out.append(self._ranked(doc))
            else:
                out.append(doc["text"])
        return out

    def _ranked(self, doc: dict[str, Any]) -> str:
        """An object document's text under ``rank_fields``: the named fields it has, as ``field: value`` lines."""
        return "\n".join(f"{f}: {_field_text(doc[f])}" for f in self.rank_fields or () if f in doc)


def _field_text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


_NOT_COHERE = {"not": {"required": ["documents"]}}  # a body with documents is the Cohere shape


class TEIRequest(Extras):
    """Body of TEI's ``POST /rerank`` (told apart from the Cohere shape by ``texts``); other fields are ignored,
    as TEI ignores them."""

    model_config = ConfigDict(extra="ignore", json_schema_extra=_NOT_COHERE)

    query: StrictStr = Field(description="The search query; must contain a non-whitespace character.",
                             json_schema_extra=_QUERY)
    texts: list[StrictStr] = Field(min_length=1, description="The documents.")
    raw_scores: StrictBool = Field(default=False, description="score is the raw attention score instead of "
                                   "the calibrated relevance in [0, 1].")
    return_text: StrictBool = Field(default=False, description="Echo each result's text.")
    truncate: StrictBool | None = Field(default=None, description="Accepted; documents are always cut to the "
                                        "engine's per-document cap (or chunked: max_chunks_per_doc) and long "
                                        "lists are windowed.")
    truncation_direction: Literal["left", "right", "Left", "Right"] | None = Field(
        default=None, description="Accepted; truncation keeps the start of each document.")
    top_n: PositiveInt | None = Field(default=None, description="Not TEI's (TEI ignores it): return only the best "
                                      "top_n (default: all).")

    @field_validator("query")
    @classmethod
    def _query_ok(cls, value: str) -> str:
        return _query_not_blank(value)

    @field_validator("texts")
    @classmethod
    def _texts_unicode(cls, value: list[str]) -> list[str]:
        for text in value:
            check_unicode(text)
        return value


# -- from a ranking to results ------------------------------------------------------------------------------------
class Scored:
    """A checked ranking: indices best first, raw and calibrated scores, evidence and heads.

    A malformed ranking is a server bug (500), not the client's: ``operator.index`` refuses float indices so
    one cannot be silently truncated into a wrong document.
    """

    def __init__(self, ranking: Any, n_documents: int, calibration: Calibration, evidence: int = 0) -> None:
        self.indices = [operator.index(i) for i in ranking.indices]
        self.raw = [float(s) for s in ranking.scores]
        if len(self.indices) != len(self.raw):
            raise ValueError(f"reranker returned {len(self.indices)} indices but {len(self.raw)} scores")
        if sorted(self.indices) != list(range(n_documents)):
            raise ValueError(f"reranker returned indices that are not a permutation of 0..{n_documents - 1}")
        if not all(math.isfinite(s) for s in self.raw):
            raise ValueError("reranker returned a non-finite score")
        self.relevance = [float(p) for p in np.clip(calibration.relevance(self.raw), 0.0, 1.0)]
        heads = getattr(ranking, "heads", None)
        self.heads = None if heads is None else [[operator.index(a), operator.index(b)] for a, b in heads]
        weights = getattr(ranking, "weights", None)
        self.weights = None if weights is None else [float(w) for w in weights]
        self.evidence: list[list[dict[str, Any]]] | None = None
        got = getattr(ranking, "evidence", None) if evidence else None
        if got is not None:
            if len(got) != len(self.indices):
                raise ValueError("reranker returned evidence not aligned with its indices")
            self.evidence = [[{"text": str(e["text"]), "share": float(e["share"])} for e in list(items)[:evidence]]
                             for items in got]


def cohere_results(scored: Scored, texts: Sequence[str], top_n: int | None, return_documents: bool,
                   raw_scores: bool, evidence: bool) -> list[dict[str, Any]]:
    keep = len(scored.indices) if top_n is None else min(top_n, len(scored.indices))
    out = []
    for rank in range(keep):
        i = scored.indices[rank]
        item: dict[str, Any] = {"index": i, "relevance_score": scored.relevance[rank]}
        if return_documents:
            item["document"] = {"text": texts[i]}
        if raw_scores:
            item["raw_score"] = scored.raw[rank]
        if evidence:
            item["evidence"] = scored.evidence[rank] if scored.evidence is not None else []
        out.append(item)
    return out


def tei_results(scored: Scored, texts: Sequence[str], top_n: int | None, raw_scores: bool, return_text: bool,
                evidence: bool) -> list[dict[str, Any]]:
    out = []
    for rank, i in enumerate(scored.indices[:top_n]):
        item: dict[str, Any] = {"index": i, "score": scored.raw[rank] if raw_scores else scored.relevance[rank]}
        if return_text:
            item["text"] = texts[i]
        if evidence:
            item["evidence"] = scored.evidence[rank] if scored.evidence is not None else []
        out.append(item)
    return out


def allowed_fields(model: type[BaseModel]) -> str:
    return ", ".join(model.model_fields)


__all__ = ["RerankRequest", "TEIRequest", "Scored", "clip"]
