"""Reading documents from files and showing evidence on a terminal."""

from __future__ import annotations

import json
from pathlib import Path

from routehead.engine.prompt import document_text
from routehead.errors import RouteheadError
from routehead.offline.data import doc_text


def read_documents(path: str, layout: str | None = None) -> list[str]:
    """Documents from JSONL (``text``, optional ``title``, joined as the prompt layout joins them: ``title\\ntext``,
    ``title. text`` under v1), TSV (``id<TAB>text``: the last column) or plain lines."""
    p = Path(path)
    if not p.is_file():
        raise RouteheadError(f"documents file not found: {path}")
    lines = [ln for ln in p.read_text(encoding="utf-8").splitlines() if ln.strip()]
    docs = []
    for i, line in enumerate(lines, 1):
        if p.suffix == ".jsonl" or line.lstrip().startswith("{"):
            try:
                obj = json.loads(line)
                text = obj["text"]
            except (ValueError, KeyError, TypeError) as exc:
                raise RouteheadError(f"{path}:{i}: expected a JSON object with a 'text' field ({exc})") from None
            title = obj.get("title")
            docs.append(doc_text({"title": title, "text": str(text)}) if layout == "v1"
                        else document_text(str(text), title))
        elif p.suffix == ".tsv":
            docs.append(line.split("\t")[-1])
        else:
            docs.append(line)
    if not docs:
        raise RouteheadError(f"{path} holds no documents")
    return docs


def highlight(text: str, words: list[str], tty: bool, width: int = 300) -> str:
    """An excerpt of ``text`` around its first evidence word, every evidence word marked (ANSI bold yellow on a
    terminal, ``**word**`` otherwise): where in the document the attention went, at a glance."""
    import re

    words = [w for w in words if w]
    if not words:
        return text.replace("\n", " ")[:width]
    pattern = re.compile("|".join(re.escape(w) for w in sorted(words, key=len, reverse=True)))
    flat = text.replace("\n", " ")
    first = pattern.search(flat)
    start = max(0, (first.start() if first else 0) - width // 5)
    piece = flat[start:start + width]
    on, off = ("\033[1;33m", "\033[0m") if tty else ("**", "**")
    marked = pattern.sub(lambda m: f"{on}{m.group(0)}{off}", piece)
    return ("..." if start else "") + marked + ("..." if start + width < len(flat) else "")
