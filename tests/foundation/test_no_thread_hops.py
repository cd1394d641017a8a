"""No route sends a request through FastAPI's thread pool: every dependency and endpoint
is `async def` (a plain `def` runs in a worker thread, a hand-off per request)."""

from __future__ import annotations

import inspect

from fastapi import FastAPI
from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute, iter_route_contexts


def _is_async(call: object) -> bool:
    return inspect.iscoroutinefunction(call) or inspect.isasyncgenfunction(call)


def _sync_calls(dependant: Dependant) -> list[str]:
    found = []
    for sub in dependant.dependencies:
        if sub.call is not None and not _is_async(sub.call):
            found.append(getattr(sub.call, "__qualname__", repr(sub.call)))
        found += _sync_calls(sub)
    return found


def test_every_dependency_and_endpoint_is_async(app: FastAPI) -> None:
    offenders = set()
    for route in iter_route_contexts(app.routes):
        original = route.original_route
        if not isinstance(original, APIRoute):
            continue
        if not _is_async(original.endpoint):
            offenders.add(f"{original.path}: endpoint {original.endpoint.__qualname__}")
        offenders.update(f"{original.path}: {name}" for name in _sync_calls(route.dependant))
    assert not offenders, sorted(offenders)
