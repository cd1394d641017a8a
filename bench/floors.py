"""Floor apps for `bench.read_paths`: what an authenticated list read costs without Koinonia.

Each is a module-level ASGI app served alone by uvicorn, one process, as

    uvicorn bench.floors:NAME --loop uvloop --http httptools --no-access-log

and answers every GET with a page shaped like `GET /api/v1/members?limit=20`:
`{"data": [20 member rows], "next_cursor": "..."}`.

* `bare_json`: plain ASGI; the page is built once at start, `json.dumps` per request.
* `bare_fastapi`: FastAPI, one GET route with a `response_model` like `MemberOut`
  (validated and serialised by pydantic per request).
* `asyncpg_floor`: plain ASGI + an asyncpg pool (through PgBouncer: no statement cache)
  running the member list's indexed query for `BENCH_FLOOR_CHURCH_ID`; JSON out.
* `same_stack_floor`: plain ASGI doing what the route must do with Koinonia's own parts:
  the bearer token decoded and verified by pyjwt (HS256, signature, `exp`, `iss`; no
  cache), ONE Redis call (EVALSHA of a small GCRA rate-limit script, redis.asyncio), the
  same query through a psycopg 3 `AsyncConnectionPool` (autocommit,
  `prepare_threshold=None`, PgBouncer), JSON out.

The database floors answer what they read: the phone stays the stored ciphertext
(`phone_ct`, base64); decrypting it (AES-GCM per row, as the real route does) is not part of
the floors (`bench.read_paths` prints its cost apart).

Like the API, the database floors answer 503 after waiting 5 s for a pooled connection
(DATABASE_POOL_TIMEOUT), and the same-stack floor's Redis client has the API's options
(0.5 s timeouts, at most 200 connections) and lets a request through when Redis fails (the
API's limiter then falls back to its in-process state). At shutdown each floor prints a
`FLOOR_STATS {...}` line with the count of such events.

Configuration (environment): `BENCH_FLOOR_DSN` (libpq URL, e.g. through PgBouncer),
`BENCH_FLOOR_POOL_SIZE` (default 10, the API's `DATABASE_POOL_SIZE`),
`BENCH_FLOOR_CHURCH_ID` (asyncpg floor), `BENCH_FLOOR_REDIS_URL` and
`BENCH_FLOOR_JWT_SECRET` (same-stack floor).
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import os
import sys
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from typing import Annotated, Any

from fastapi import FastAPI
from pydantic import BaseModel, ConfigDict, PlainSerializer

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

PAGE = 20
# The member list's query (members/routes.py with service.live), as the API runs it for
# `?limit=20`: the page plus one row that says whether there is a next page.
MEMBER_COLUMNS = (
    "id, first_name, last_name, phone_ct, email_ct, opted_out, opted_out_at, "
    "opted_out_source, is_unknown, created_at, updated_at"
)
MEMBERS_SQL_ASYNCPG = (
    f"SELECT {MEMBER_COLUMNS} FROM members WHERE church_id = $1 AND deleted_at IS NULL "
    "ORDER BY created_at DESC, id DESC LIMIT $2"
)
MEMBERS_SQL_PSYCOPG = MEMBERS_SQL_ASYNCPG.replace("$1", "%s").replace("$2", "%s")

# GCRA in one round trip (the shape of koinonia.ratelimit's script): KEYS[1] bucket;
# ARGV[1] emission interval ms, ARGV[2] burst. Returns {allowed, remaining}.
RATE_LIMIT_LUA = """
local interval = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
local tolerance = interval * burst
local new_tat = tat + interval
if new_tat - now > tolerance then return {0, 0} end
redis.call('SET', KEYS[1], new_tat, 'PX', new_tat - now)
return {1, math.floor((tolerance - (new_tat - now)) / interval)}
"""
RATE_INTERVAL_MS = 1  # RATE_LIMIT_PER_MINUTE=6,000,000 rounds to 1 ms, as in the API
RATE_BURST = 6_000_000
JWT_ISSUER = "koinonia"
# As the API: DATABASE_POOL_TIMEOUT (then 503), and koinonia.redis.create_redis's client
# (REDIS_TIMEOUT 0.5 s, at most 200 connections; on a Redis error the API's limiter falls
# back to its in-process state, so the floor lets the request through: fail open).
POOL_TIMEOUT = 5.0
REDIS_TIMEOUT = 0.5
REDIS_MAX_CONNECTIONS = 200
STATS_MARK = "FLOOR_STATS "


def _env(name: str, default: str | None = None) -> str:
    value = os.environ.get(name, default)
    if value is None:
        raise RuntimeError(f"{name} is not set (bench.floors)")
    return value


def _rfc3339(value: dt.datetime | None) -> str | None:
    if value is None:
        return None
    if value.tzinfo is None:
        value = value.replace(tzinfo=dt.UTC)
    return value.astimezone(dt.UTC).isoformat().replace("+00:00", "Z")


def _cursor(created_at: dt.datetime, row_id: Any) -> str:
    raw = json.dumps([created_at.isoformat(), str(row_id)], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def page_of(rows: Sequence[Sequence[Any]]) -> dict[str, Any]:
    """`{"data", "next_cursor"}` from rows of MEMBER_COLUMNS fetched with LIMIT PAGE + 1."""
    data = [
        {
            "id": str(row[0]),
            "first_name": row[1],
            "last_name": row[2],
            "phone_ct": base64.b64encode(bytes(row[3])).decode(),
            "email_ct": base64.b64encode(bytes(row[4])).decode() if row[4] else None,
            "opted_out": row[5],
            "opted_out_at": _rfc3339(row[6]),
            "opted_out_source": row[7],
            "is_unknown": row[8],
            "created_at": _rfc3339(row[9]),
            "updated_at": _rfc3339(row[10]),
        }
        for row in rows[:PAGE]
    ]
    last = rows[PAGE - 1] if len(rows) > PAGE else None
    return {"data": data, "next_cursor": _cursor(last[9], last[0]) if last else None}


def sample_members(count: int = PAGE) -> list[dict[str, Any]]:
    """Member-like rows with the API's field names and value types (decrypted phone)."""
    base = dt.datetime(2026, 11, 1, 9, 30, tzinfo=dt.UTC)
    return [
        {
            "id": uuid.UUID(int=0x5EED_0000_0000_4000_8000_0000_0000_0000 + i),
            "first_name": f"Member{i}",
            "last_name": "Bench",
            "phone": f"+1303200{1000 + i:04d}",
            "email": None,
            "opted_out": False,
            "opted_out_at": None,
            "opted_out_source": None,
            "is_unknown": False,
            "created_at": base - dt.timedelta(seconds=i),
            "updated_at": base - dt.timedelta(seconds=i),
        }
        for i in range(count)
    ]


def _jsonable(value: Any) -> Any:
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, dt.datetime):
        return _rfc3339(value)
    return value


def _json_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{key: _jsonable(value) for key, value in row.items()} for row in rows]


# --- plain ASGI plumbing -----------------------------------------------------------------


async def _respond(send: Send, status: int, body: bytes) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def _lifespan(
    receive: Receive,
    send: Send,
    startup: Callable[[], Awaitable[None]],
    shutdown: Callable[[], Awaitable[None]],
) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            try:
                await startup()
            except Exception as exc:  # uvicorn prints it and exits
                await send({"type": "lifespan.startup.failed", "message": repr(exc)})
                return
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await shutdown()
            await send({"type": "lifespan.shutdown.complete"})
            return


async def _nothing() -> None:
    return None


def _header(scope: Scope, name: bytes) -> bytes:
    for key, value in scope["headers"]:
        if key == name:
            return bytes(value)
    return b""


# --- 1. bare_json ------------------------------------------------------------------------

_SAMPLE = sample_members()
_BARE_ROWS = _json_rows(_SAMPLE)
_BARE_CURSOR = _cursor(_SAMPLE[-1]["created_at"], _SAMPLE[-1]["id"])


async def bare_json(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] == "lifespan":
        await _lifespan(receive, send, _nothing, _nothing)
        return
    body = json.dumps({"data": _BARE_ROWS, "next_cursor": _BARE_CURSOR}).encode()
    await _respond(send, 200, body)


# --- 2. bare_fastapi ---------------------------------------------------------------------

Timestamp = Annotated[dt.datetime, PlainSerializer(_rfc3339, return_type=str, when_used="json")]


class MemberRow(BaseModel):
    """Like koinonia.members.schemas.MemberOut."""

    model_config = ConfigDict(from_attributes=True)

    id: uuid.UUID
    first_name: str
    last_name: str
    phone: str
    email: str | None
    opted_out: bool
    opted_out_at: Timestamp | None
    opted_out_source: str | None
    is_unknown: bool
    created_at: Timestamp
    updated_at: Timestamp


class MemberPage(BaseModel):
    data: list[MemberRow]
    next_cursor: str | None


_FASTAPI_ROWS = sample_members()  # native types: pydantic validates and serialises them
bare_fastapi = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)


@bare_fastapi.get("/api/v1/members", response_model=MemberPage)
async def list_members() -> dict[str, Any]:
    return {"data": _FASTAPI_ROWS, "next_cursor": _BARE_CURSOR}


# --- 3. asyncpg_floor --------------------------------------------------------------------


def _print_stats(name: str, counts: Counter[str]) -> None:
    """One line on stdout (the floor's log) at shutdown: what went wrong, if anything."""
    sys.stdout.write(STATS_MARK + json.dumps({"floor": name, **counts}) + "\n")
    sys.stdout.flush()


class _AsyncpgFloor:
    def __init__(self) -> None:
        self.pool: Any = None
        self.church_id: uuid.UUID | None = None
        self.counts: Counter[str] = Counter()

    async def startup(self) -> None:
        import asyncpg  # type: ignore[import-untyped]

        self.church_id = uuid.UUID(_env("BENCH_FLOOR_CHURCH_ID"))
        size = int(_env("BENCH_FLOOR_POOL_SIZE", "10"))
        # PgBouncer in transaction mode: no named prepared statements (asyncpg then uses
        # the unnamed one, parse/describe then bind/execute, held by a Flush, not a Sync).
        self.pool = await asyncpg.create_pool(
            _env("BENCH_FLOOR_DSN"), min_size=size, max_size=size, statement_cache_size=0
        )

    async def shutdown(self) -> None:
        if self.pool is not None:
            await self.pool.close()
        _print_stats("asyncpg_floor", self.counts)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send, self.startup, self.shutdown)
            return
        try:
            async with self.pool.acquire(timeout=POOL_TIMEOUT) as connection:
                rows = await connection.fetch(MEMBERS_SQL_ASYNCPG, self.church_id, PAGE + 1)
        except TimeoutError:
            self.counts["pool_timeouts"] += 1
            await _respond(send, 503, b'{"title":"Service unavailable"}')
            return
        await _respond(send, 200, json.dumps(page_of(rows)).encode())


asyncpg_floor = _AsyncpgFloor()


# --- 4. same_stack_floor -----------------------------------------------------------------


class _SameStackFloor:
    def __init__(self) -> None:
        self.pool: Any = None
        self.redis: Any = None
        self.script: Any = None
        self.secret = ""
        self.counts: Counter[str] = Counter()

    async def startup(self) -> None:
        from psycopg_pool import AsyncConnectionPool
        from redis.asyncio import Redis

        self.secret = _env("BENCH_FLOOR_JWT_SECRET")
        size = int(_env("BENCH_FLOOR_POOL_SIZE", "10"))
        self.pool = AsyncConnectionPool(
            _env("BENCH_FLOOR_DSN"),
            min_size=size,
            max_size=size,
            kwargs={"autocommit": True, "prepare_threshold": None},
            open=False,
        )
        await self.pool.open(wait=True)
        self.redis = Redis.from_url(
            _env("BENCH_FLOOR_REDIS_URL"),
            socket_timeout=REDIS_TIMEOUT,
            socket_connect_timeout=REDIS_TIMEOUT,
            health_check_interval=30,
            decode_responses=False,
            max_connections=REDIS_MAX_CONNECTIONS,
        )
        self.script = self.redis.register_script(RATE_LIMIT_LUA)

    async def shutdown(self) -> None:
        if self.pool is not None:
            await self.pool.close()
        if self.redis is not None:
            await self.redis.aclose()
        _print_stats("same_stack_floor", self.counts)

    def _claims(self, scope: Scope) -> dict[str, Any] | None:
        import jwt

        scheme, _, token = _header(scope, b"authorization").decode("latin-1").partition(" ")
        if scheme.lower() != "bearer" or not token:
            return None
        try:
            claims: dict[str, Any] = jwt.decode(
                token.strip(),
                self.secret,
                algorithms=["HS256"],
                issuer=JWT_ISSUER,
                options={"require": ["exp", "iat", "sub", "church", "role"]},
            )
        except jwt.PyJWTError:
            return None
        return claims if claims.get("typ") == "access" else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send, self.startup, self.shutdown)
            return
        claims = self._claims(scope)
        if claims is None:
            await _respond(send, 401, b'{"title":"The access token is not valid"}')
            return
        from psycopg_pool import PoolTimeout
        from redis.exceptions import RedisError

        try:
            allowed, _remaining = await self.script(
                keys=[f"bench:floor:principal:{claims['sub']}"],
                args=[RATE_INTERVAL_MS, RATE_BURST],
            )
        except RedisError:
            self.counts["redis_errors"] += 1
            allowed = 1
        if not allowed:
            await _respond(send, 429, b'{"title":"Too many requests"}')
            return
        church_id = uuid.UUID(claims["church"])
        try:
            async with self.pool.connection(timeout=POOL_TIMEOUT) as connection:
                cursor = await connection.execute(MEMBERS_SQL_PSYCOPG, (church_id, PAGE + 1))
                rows = await cursor.fetchall()
        except PoolTimeout:
            self.counts["pool_timeouts"] += 1
            await _respond(send, 503, b'{"title":"Service unavailable"}')
            return
        await _respond(send, 200, json.dumps(page_of(rows)).encode())


same_stack_floor = _SameStackFloor()

FLOORS = ("bare_json", "bare_fastapi", "asyncpg_floor", "same_stack_floor")
