"""Merge fields (`{{first_name}}` …): validation on save and the one rendering function.

Messaging renders every recipient's text with `render`; `validate` is what the API runs
when a template or a message body is saved, so rendering never meets an unknown field.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

MERGE_FIELDS = ("first_name", "last_name", "church_name")
_FIELD = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")
_BRACES = re.compile(r"\{\{|\}\}")


@dataclass(frozen=True, slots=True)
class MergeFieldProblem:
    position: int
    message: str


def problems(body: str) -> list[MergeFieldProblem]:
    found: list[MergeFieldProblem] = []
    covered: set[int] = set()
    for match in _FIELD.finditer(body):
        covered.update((match.start(), match.end() - 2))
        if match.group(1) not in MERGE_FIELDS:
            found.append(
                MergeFieldProblem(
                    match.start(),
                    f"unknown merge field {{{{{match.group(1)}}}}}; "
                    f"use {', '.join('{{' + f + '}}' for f in MERGE_FIELDS)}",
                )
            )
    for brace in _BRACES.finditer(body):
        if brace.start() not in covered:
            found.append(MergeFieldProblem(brace.start(), f"unmatched '{brace.group()}'"))
    return sorted(found, key=lambda p: p.position)


def fields_used(body: str) -> set[str]:
    return {m.group(1) for m in _FIELD.finditer(body)}


def render(body: str, values: Mapping[str, str | None]) -> str:
    """Fill each merge field; a missing value renders as nothing (and spaces collapse)."""
    if "{{" not in body:
        return body
    text = _FIELD.sub(lambda m: values.get(m.group(1)) or "", body)
    return re.sub(r"[ \t]{2,}", " ", text).strip()
