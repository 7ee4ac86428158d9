"""The OpenAPI request schema and the parser agree (issue #36 item 7): a body the served schema declares valid is
answered 200, one it declares invalid gets a JSON 422, case by case around object documents and ``rank_fields``
(the cases schemathesis found, or could), checked with a JSON Schema validator against ``/openapi.json``; and the
rules no JSON Schema can state (a lone surrogate, the length of the text ranked with ``rank_fields``) answer 422,
never a 5xx.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import jsonschema
import pytest
from fastapi.testclient import TestClient

from routehead.service import Limits, create_app
from tests.service.conftest import BatchFake, assert_error

CAP = 20  # max_document_chars
LIMITS = Limits(max_documents=5, max_document_chars=CAP, max_query_chars=30, max_request_bytes=64_000)
LONG, FULL = "x" * (CAP + 1), "y" * CAP


@pytest.fixture(scope="module")
def tc() -> Iterator[TestClient]:
    with TestClient(create_app(BatchFake(), LIMITS), raise_server_exceptions=False) as client:
        yield client


@pytest.fixture(scope="module")
def validators(tc: TestClient) -> dict[str, jsonschema.Validator]:
    spec = tc.get("/openapi.json").json()
    return {path: jsonschema.Draft202012Validator(
        spec["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"])
        for path in ("/v1/rerank", "/v2/rerank", "/rerank")}


def _post(tc: TestClient, path: str, raw: str) -> Any:
    return tc.post(path, content=raw, headers={"content-type": "application/json"})


def _body(documents: list[Any], rank_fields: Any = "absent", **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"query": "cat", "documents": documents, "return_documents": True, **extra}
    if rank_fields != "absent":
        body["rank_fields"] = rank_fields
    return body


# (name, body, valid): valid means both "the schema declares it valid" and "the server answers 200"
AGREE = [
    # the schemathesis case (seed 323361082189901393570223837418573550010): with rank_fields, "text" is a field
    # like any other, ignored unless named (as Cohere ignores it), so its length is not limited; it was a 200
    # that the schema declared invalid
    ("rank_fields, unranked text over the cap", _body([{"text": LONG, "": {"k": [{}]}, "n": None}], ["", "z"]),
     True),
    ("rank_fields, unranked text over the cap, no named field", _body([{"text": LONG}], ["title"]), True),
    ("rank_fields, ranked text at the cap", _body([{"text": "y" * (CAP - len("text: "))}], ["text"]), True),
    ("no rank_fields, text over the cap", _body([{"text": LONG}]), False),
    ("no rank_fields, text at the cap", _body([{"text": FULL, "extra": LONG}]), True),
    ("empty rank_fields, text over the cap", _body([{"text": LONG}], []), False),
    ("null rank_fields, text over the cap", _body([{"text": LONG}], None), False),
    ("string over the cap, with rank_fields", _body([LONG], ["a"]), False),
    ("string at the cap, with rank_fields", _body([FULL], ["a"]), True),
    ("no rank_fields, object without text", _body([{"a": "cat"}]), False),
    ("no rank_fields, empty object", _body([{}]), False),
    ("empty rank_fields, object without text", _body([{"a": "cat"}], []), False),
    ("rank_fields, object without text", _body([{"a": "cat"}], ["a"]), True),
    ("rank_fields, empty object", _body([{}], ["a"]), True),
    ("rank_fields, non-string values", _body([{"a": 5, "b": [None], "c": {}}], ["a", "b"]), True),
    ("extra keys of any type", _body([{"text": "cat", "n": 1, "o": {"p": [1]}, "z": None}]), True),
    ("text null", _body([{"text": None}]), False),
    ("text a number, with rank_fields", _body([{"text": 5, "a": "cat"}], ["a"]), False),
    ("rank_fields not strings", _body([{"a": "cat"}], [1]), False),
    ("rank_fields a string", _body([{"a": "cat"}], "a"), False),
    ("document an array", _body([["cat"]], ["a"]), False),
    ("first_stage_scores, the largest float", _body(["cat"], first_stage_scores=[1.7976931348623157e308]), True),
]


@pytest.mark.parametrize("path", ["/v1/rerank", "/rerank"])
@pytest.mark.parametrize(("body", "valid"), [pytest.param(b, v, id=n) for n, b, v in AGREE])
def test_schema_and_server_agree(tc: TestClient, validators: dict[str, jsonschema.Validator], path: str,
                                 body: dict[str, Any], valid: bool) -> None:
    assert validators[path].is_valid(body) is valid, list(validators[path].iter_errors(body))
    resp = _post(tc, path, json.dumps(body))
    if valid:
        assert resp.status_code == 200, resp.text
    else:
        assert_error(resp, 422, resp.json()["error"]["type"])


BIG = "1" + "0" * 400  # an integer no float holds
# the schema's bound is 1.7976931348623157e308 as written, 17976931348623157 * 10**292 exactly; this integer is one
# past it yet below the float maximum itself (179769313486231570814...): schemathesis seed
# 33407551167068918955643580803425517043 found it accepted (200)
JUST_PAST = "-17976931348623157" + "0" * 291 + "1"


@pytest.mark.parametrize(("raw", "fragment"), [
    (f'{{"query": "cat", "documents": ["a"], "first_stage_scores": [{BIG}]}}', "first_stage_scores[0]: must be a "
     "finite number"),
    ('{"query": "cat", "documents": ["a"], "first_stage_scores": [-1e400]}', "first_stage_scores[0]: must be a "
     "finite number"),
])
def test_numbers_past_a_float_are_refused_as_the_schema_says(tc: TestClient, validators: dict[str, Any],
                                                             raw: str, fragment: str) -> None:
    """``1e400`` decodes to -inf/inf and a 400-digit integer cannot become a float (it was a 500): the schema's
    ``minimum``/``maximum`` and the validator both refuse them."""
    assert not validators["/v1/rerank"].is_valid(json.loads(raw))
    assert_error(_post(tc, "/v1/rerank", raw), 422, "validation_error", fragment)


def test_an_integer_just_past_the_schemas_bound_is_refused(tc: TestClient) -> None:
    """The schema's ``minimum`` read as the decimal it is written as (schemathesis reads it so; Python's jsonschema
    compares against the float, whose exact value is a little larger): an integer one past it is a 422."""
    bound = re.search(r'"minimum":\s*(-[0-9.e+]+)', tc.get("/openapi.json").text).group(1)
    assert Decimal(JUST_PAST) < Decimal(bound)
    raw = f'{{"query": "cat", "documents": ["a"], "first_stage_scores": [{JUST_PAST}]}}'
    assert_error(_post(tc, "/v1/rerank", raw), 422, "validation_error",
                 "first_stage_scores[0]: must be a finite number")


@pytest.mark.parametrize("raw", [
    '{"query": "cat", "documents": [{"a": "\\ud800"}], "rank_fields": ["a"], "return_documents": true}',
    '{"query": "cat", "documents": [{"\\ud800": "x"}], "rank_fields": ["\\ud800"], "return_documents": true}',
    '{"query": "cat", "documents": [{"a": {"b": "\\ud800"}}], "rank_fields": ["a"]}',
])
def test_lone_surrogate_in_a_ranked_field_is_422_not_500(tc: TestClient, raw: str) -> None:
    """A lone surrogate (legal in a JSON escape, not in UTF-8) in a field named by rank_fields is refused like one
    in a string document or a "text" (it was a 500 when the ranked text was echoed)."""
    assert_error(_post(tc, "/v1/rerank", raw), 422, "validation_error", "documents[0]", "rank_fields", "Unicode")
    # one in a field not ranked is ignored like the field
    ok = _post(tc, "/v1/rerank", '{"query": "cat", "documents": [{"text": "x", "\\ud800": "\\ud800"}], '
               '"return_documents": true}')
    assert ok.status_code == 200 and ok.json()["results"][0]["document"] == {"text": "x"}


def test_ranked_text_over_the_cap_with_rank_fields_is_422_naming_the_rule(tc: TestClient) -> None:
    """The one length rule no JSON Schema can state (the text ranked with rank_fields is the named fields as
    'field: value' lines; the schema says so in its descriptions): a JSON 422 that names it."""
    body = _body([{"a": FULL}], ["a"])
    assert_error(_post(tc, "/v1/rerank", json.dumps(body)), 422, "limit_exceeded",
                 "documents[0] (its rank_fields as 'field: value' lines)", f"max_document_chars={CAP}")
    assert_error(_post(tc, "/v1/rerank", json.dumps(_body([LONG]))), 422, "limit_exceeded",
                 f"documents[0] has {CAP + 1} characters")
