"""A test app with a few extra routes exercising validation and error mapping."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

import httpx
import pytest
from fastapi import APIRouter, FastAPI, Query
from pydantic import Field
from sqlalchemy import text

from koinonia.app import create_app
from koinonia.http.deps import DbSession
from koinonia.http.schemas import RequestModel
from koinonia.settings import Settings

probe = APIRouter(prefix="/api/v1/_test")


class Thing(RequestModel):
    name: str = Field(min_length=1, max_length=20)
    count: int = Field(ge=0)


@probe.post("/things", status_code=201)
async def create_thing(thing: Thing) -> dict[str, object]:
    return {"name": thing.name, "count": thing.count}


@probe.get("/things")
async def list_things(limit: Annotated[int, Query(ge=1, le=10)] = 5) -> dict[str, int]:
    return {"limit": limit}


@probe.post("/unique")
async def violate_unique(session: DbSession) -> dict[str, str]:
    await session.execute(text("CREATE TEMP TABLE t (k int UNIQUE) ON COMMIT DROP"))
    await session.execute(text("INSERT INTO t VALUES (1), (1)"))
    return {"never": "reached"}


@probe.get("/db")
async def touch_db(session: DbSession) -> dict[str, int]:
    value = (await session.execute(text("SELECT 1"))).scalar_one()
    return {"value": value}


@probe.get("/boom")
async def boom() -> None:
    raise RuntimeError("secret internals: password=hunter2 +15551234567")


@probe.get("/big")
async def big() -> dict[str, str]:
    return {"text": "x" * 5000}


def build_probe_app(settings: Settings) -> FastAPI:
    app = create_app(settings)
    app.include_router(probe)
    return app


@pytest.fixture(scope="session")
async def probe_client(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    app = build_probe_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as c:
            yield c
