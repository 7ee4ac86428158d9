"""The request bodies as ``/openapi.json`` declares them: each request model's JSON Schema, plus the served limits.

The re-rank endpoints read their body themselves (for precise errors), so FastAPI cannot infer it:
:func:`request_body` puts the schema into the operation's entry.  The schema must describe what is accepted
(schemathesis checks both ways: what it declares valid is answered, what it declares invalid is refused), so the
limits that cost nothing to check are in it: ``maxItems`` (``max_documents``) and ``maxLength``
(``max_query_chars``, and ``max_document_chars`` on the text ranked where the schema can name it: a string
document, and an object's ``text`` without ``rank_fields``).  What no JSON Schema can state stays in the
descriptions: the prompt token limit (the reranker counts), ``max_request_bytes``, ``max_document_chars`` on the
text ranked with ``rank_fields`` (the named fields, joined), and ``first_stage_scores`` having one score per
document (``x-same-length-as``).
"""

from __future__ import annotations

import copy
from typing import Any

from pydantic import BaseModel

from routehead.service.config import Limits


def _inline_refs(schema: dict[str, Any]) -> dict[str, Any]:
    """Inline pydantic's ``$defs`` so a schema can sit inside the OpenAPI document as is."""
    defs = schema.pop("$defs", {})

    def walk(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/$defs/"):
                return walk(dict(defs[ref.rsplit("/", 1)[1]]))
            return {k: walk(v) for k, v in node.items()}
        if isinstance(node, list):
            return [walk(v) for v in node]
        return node

    return walk(schema)


def _cap_document(item: dict[str, Any], max_chars: int, text: bool) -> None:
    """``maxLength`` on a document: a string, and (``text``) an object's ``text``."""
    for branch in item.get("anyOf", [item]):
        if branch.get("type") == "string":
            branch["maxLength"] = max_chars
        elif text and branch.get("type") == "object" and "text" in branch.get("properties", {}):
            branch["properties"]["text"]["maxLength"] = max_chars


def with_limits(schema: dict[str, Any], limits: Limits) -> dict[str, Any]:
    """``schema`` (a request model's) with the limits it can state.

    An object document's ``text`` is capped only in the branch without ``rank_fields`` (the model's ``else``):
    with ``rank_fields`` it is ranked only if named, and a field not ranked is not limited."""
    props = schema.get("properties", {})
    if "query" in props:
        props["query"]["maxLength"] = limits.max_query_chars
    for name in ("documents", "texts"):
        if name in props:
            props[name]["maxItems"] = limits.max_documents
            _cap_document(props[name]["items"], limits.max_document_chars, text=False)
    ranked_text = schema.get("else", {}).get("properties", {}).get("documents")
    if ranked_text is not None:
        _cap_document(ranked_text["items"], limits.max_document_chars, text=True)
    return schema


def request_body(*models: type[BaseModel], limits: Limits | None = None) -> dict[str, Any]:
    """``openapi_extra`` declaring a JSON body of one of ``models``, with the served ``limits``."""
    schemas = [_inline_refs(copy.deepcopy(m.model_json_schema())) for m in models]
    if limits is not None:
        schemas = [with_limits(s, limits) for s in schemas]
    schema = schemas[0] if len(schemas) == 1 else {"anyOf": schemas}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}
