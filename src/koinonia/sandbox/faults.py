"""Fault injection shared by the played APIs."""

from __future__ import annotations

import asyncio

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
