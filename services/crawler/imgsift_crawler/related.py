"""Widening a query: related terms and translations, from a list the user can edit.

The built-in list (``related_terms.json``, COCO's 80 classes) maps a term to related search
terms and to translations. Replace it with ``IMGSIFT_CRAWLER_RELATED_TERMS`` (a JSON file of
the same shape), or give a job its own ``related_queries``.
"""

from __future__ import annotations

import json
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

Terms = dict[str, dict[str, Any]]


@cache
def load_terms(path: str | None = None) -> Terms:
    """The related-terms list: ``{term: {"related": [...], "translations": {lang: text}}}``."""
    if path:
        raw = Path(path).read_text(encoding="utf-8")
    else:
        raw = resources.files("imgsift_crawler").joinpath("related_terms.json").read_text(encoding="utf-8")
    data = json.loads(raw)
    return {key.lower().strip(): value for key, value in data.items() if not key.startswith("_")}


def widened_queries(
    query: str | None,
    target: str,
    related_queries: list[str] | None,
    languages: list[str],
    terms: Terms,
) -> list[str]:
    """The queries to try after ``query``, in order: related terms, then translations."""
    keys = [k for k in (query, target) if k]
    entries = [terms[k.lower().strip()] for k in keys if k.lower().strip() in terms]
    if related_queries is not None:
        related = list(related_queries)
    else:
        related = [term for entry in entries for term in entry.get("related", [])]
    translated = [
        entry["translations"][lang] for lang in languages for entry in entries if lang in entry.get("translations", {})
    ]
    seen = {query.lower()} if query else set()
    out = []
    for candidate in related + translated:
        if candidate.lower() not in seen:
            seen.add(candidate.lower())
            out.append(candidate)
    return out
