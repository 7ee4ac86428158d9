"""``GET /docs``: API documentation that works offline.

FastAPI's Swagger UI and ReDoc pages load their JavaScript from a CDN, so on an air-gapped machine they are a
blank page.  This page is plain HTML rendered on the server from the same OpenAPI document as
``/openapi.json`` (every path, method, summary, request and response schema), with no script or external
asset, so it reads the same online and off.
"""

from __future__ import annotations

import html
import json
from typing import Any


def _schema_block(schema: Any) -> str:
    return f"<pre>{html.escape(json.dumps(schema, indent=1, ensure_ascii=False))}</pre>"


def docs_html(openapi: dict[str, Any]) -> str:
    """The documentation page for ``openapi`` (an OpenAPI 3 document as FastAPI builds it)."""
    info = openapi.get("info", {})
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>{html.escape(str(info.get('title', 'API')))}</title>",
        "<style>body{font-family:sans-serif;max-width:60em;margin:2em auto;padding:0 1em}"
        "pre{background:#f4f4f4;padding:.5em;overflow:auto;font-size:85%}h2{border-top:1px solid #ccc;"
        "padding-top:.5em}code{background:#f4f4f4}</style></head><body>",
        f"<h1>{html.escape(str(info.get('title', 'API')))}</h1>",
        f"<p>{html.escape(str(info.get('description', '')))}</p>",
        "<p>Machine-readable: <a href='/openapi.json'><code>/openapi.json</code></a>.</p>",
    ]
    for path, ops in openapi.get("paths", {}).items():
        for method, op in ops.items():
            parts.append(f"<h2><code>{html.escape(method.upper())} {html.escape(path)}</code></h2>")
            if op.get("summary"):
                parts.append(f"<p><b>{html.escape(op['summary'])}</b></p>")
            if op.get("description"):
                parts.append(f"<p>{html.escape(op['description'])}</p>".replace("\n\n", "</p><p>"))
            body = op.get("requestBody", {}).get("content", {}).get("application/json", {}).get("schema")
            if body is not None:
                parts.append("<h3>Request body</h3>" + _schema_block(body))
            for code, resp in op.get("responses", {}).items():
                schema = resp.get("content", {}).get("application/json", {}).get("schema")
                parts.append(f"<h3>{html.escape(str(code))} {html.escape(resp.get('description', ''))}</h3>")
                if schema is not None:
                    parts.append(_schema_block(schema))
    schemas = openapi.get("components", {}).get("schemas", {})
    if schemas:
        parts.append("<h2>Schemas</h2>")
        for name, schema in schemas.items():
            parts.append(f"<h3 id='{html.escape(name)}'>{html.escape(name)}</h3>" + _schema_block(schema))
    parts.append("</body></html>")
    return "\n".join(parts)
