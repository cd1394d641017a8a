"""Text every route receives is checked here, once, before any route code runs.

`reject_unsafe_text` is an application-wide dependency (`create_app` passes it to
`FastAPI(dependencies=...)`), so it runs for every route, present and future, before the
route's own dependencies (authentication, the unit of work). It walks:

- every query parameter value and every string path parameter;
- the JSON body the route declared (the document FastAPI already parsed: Starlette caches
  it on the request, so nothing is parsed twice), every string and object key at any depth;
- the text fields and upload file names of a form body (`multipart/form-data`).

A string with a character PostgreSQL or SMS cannot carry (`koinonia.text`) answers 422
`validation_error`, naming the field (`first_name`, `member_ids.3`, `q`). Routes that read
their raw body themselves (the signed provider webhooks) declare no body and are not
walked: their bytes belong to the signature check.
"""

from __future__ import annotations

from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.params import Form
from starlette.datastructures import UploadFile

from koinonia.text import unsafe_character

Loc = tuple[str | int, ...]
MAX_REPORTED = 20


def _check(value: str, loc: Loc, errors: list[dict[str, Any]]) -> None:
    reason = unsafe_character(value)
    if reason is not None and len(errors) < MAX_REPORTED:
        errors.append({"type": "string_unsafe_character", "loc": loc, "msg": reason, "input": ""})


def _walk(value: Any, loc: Loc, errors: list[dict[str, Any]]) -> None:
    if isinstance(value, str):
        _check(value, loc, errors)
    elif isinstance(value, dict):
        for key, item in value.items():
            _check(key, (*loc, key), errors)
            _walk(item, (*loc, key), errors)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _walk(item, (*loc, index), errors)


def _is_json(request: Request) -> bool:
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    return content_type == "application/json" or (
        content_type.startswith("application/") and content_type.endswith("+json")
    )


async def reject_unsafe_text(request: Request) -> None:
    """422 naming each field whose text contains NUL, a lone surrogate or a C0 control."""
    errors: list[dict[str, Any]] = []
    for name, value in request.query_params.multi_items():
        _check(value, ("query", name), errors)
    for name, value in request.path_params.items():
        if isinstance(value, str):
            _check(value, ("path", name), errors)
    body_field = getattr(request.scope.get("route"), "body_field", None)
    if body_field is not None:
        if isinstance(body_field.field_info, Form):
            form = await request.form()  # the form FastAPI parsed (cached on the request)
            for name, item in form.multi_items():
                if isinstance(item, UploadFile):
                    _check(item.filename or "", ("body", name), errors)
                else:
                    _walk(item, ("body", name), errors)
        elif _is_json(request) and await request.body():
            _walk(await request.json(), ("body",), errors)  # cached by Starlette
    if errors:
        raise RequestValidationError(errors)
