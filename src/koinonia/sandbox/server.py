"""The sandbox application and its control surface."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
import uvicorn
from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse

from koinonia.sandbox import stripe_api, telnyx_api, telnyx_numbers
from koinonia.sandbox.signing import load_telnyx_key, public_key_b64
from koinonia.sandbox.state import Faults, SandboxConfig, SandboxState

control = APIRouter(prefix="/sandbox", tags=["sandbox"])


@control.post("/faults")
async def set_faults(faults: Faults, request: Request) -> Faults:
    request.app.state.sandbox.faults = faults
    return faults


@control.get("/faults")
async def get_faults(request: Request) -> Faults:
    faults: Faults = request.app.state.sandbox.faults
    return faults


@control.delete("/faults", status_code=204)
async def clear_faults(request: Request) -> None:
    request.app.state.sandbox.faults = Faults()


@control.get("/public-key")
async def public_key(request: Request) -> JSONResponse:
    """The Telnyx webhook public key (base64 of the raw 32 bytes), as Telnyx shows it."""
    return JSONResponse({"public_key": public_key_b64(request.app.state.telnyx_key)})


def create_sandbox_app(
    config: SandboxConfig, *, transport: httpx.AsyncBaseTransport | None = None
) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Keep every delivery slot's connection alive between webhooks (see delivery_slots).
        limits = httpx.Limits(max_connections=16, max_keepalive_connections=16)
        async with httpx.AsyncClient(timeout=10, transport=transport, limits=limits) as client:
            app.state.sandbox.http = client
            yield
            for task in list(app.state.sandbox.tasks):
                task.cancel()

    app = FastAPI(title="Koinonia sandbox (Telnyx + Stripe)", lifespan=lifespan)
    app.state.sandbox = SandboxState(config)
    app.state.telnyx_key = load_telnyx_key(config.telnyx_private_key)
    app.include_router(control)
    app.include_router(stripe_api.router)
    app.include_router(telnyx_api.router)
    app.include_router(telnyx_numbers.router)
    return app


def run(host: str, port: int, config: SandboxConfig) -> None:
    uvicorn.run(create_sandbox_app(config), host=host, port=port, log_level="warning")
