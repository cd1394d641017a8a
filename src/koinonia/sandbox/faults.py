"""Fault injection shared by the played APIs."""

from __future__ import annotations

import asyncio
import time

from starlette.requests import Request

from koinonia.sandbox.state import SandboxState


async def inject(state: SandboxState) -> int | None:
    """Apply latency; answers an error status to return, or None to proceed."""
    faults = state.faults
    if faults.latency_ms:
        await asyncio.sleep(faults.latency_ms / 1000)
    if state.roll(faults.error_rate):
        return faults.status
    return None


async def maybe_hang(state: SandboxState) -> None:
    """A timeout fault: hold the answer longer than any sane client waits."""
    if state.roll(state.faults.timeout_rate):
        await asyncio.sleep(state.config.timeout_hold_seconds)


async def hang_until_gone(request: Request, state: SandboxState) -> bool:
    """An `accept_then_hang_rate` fault: hold the answer until the client hangs up (True),
    or for at most `timeout_hold_seconds` (False), so a server can still shut down."""
    deadline = time.monotonic() + state.config.timeout_hold_seconds
    while time.monotonic() < deadline:
        if await request.is_disconnected():
            return True
        await asyncio.sleep(0.05)
    return False
