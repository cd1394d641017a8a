"""The per-process send context follows the resources it was built from, never an `id()`
that a later, different resources object happens to reuse."""

from __future__ import annotations

from koinonia.jobs import build_job_app, open_resources
from koinonia.messaging import jobs as messaging_jobs
from koinonia.settings import Settings


async def test_a_reused_id_does_not_hand_out_closed_clients(settings: Settings) -> None:
    async with open_resources(settings, build_job_app(settings)) as first:
        old = messaging_jobs.send_context(first)
        assert messaging_jobs.send_context(first) is old  # one per open resources
    async with open_resources(settings, build_job_app(settings)) as second:
        # What CPython does when `first` is freed and `second` lands at its address.
        messaging_jobs._contexts.clear()
        messaging_jobs._contexts[id(second)] = (first, old)
        fresh = messaging_jobs.send_context(second)
        assert fresh is not old
        assert fresh.telnyx is second.telnyx
