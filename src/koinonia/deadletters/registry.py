"""What replaying a dead letter means, per kind: features register their replayers here."""

from __future__ import annotations

import importlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from koinonia.deadletters.tables import DeadLetter
from koinonia.settings import Settings


@dataclass(frozen=True, slots=True)
class ReplayContext:
    """What a replayer may use besides the session: the process's job app (to defer with
    `koinonia.jobs.defer_in_transaction(context.job_app, session, ...)`) and settings."""

    job_app: Any
    settings: Settings


# A replayer re-queues the work inside the caller's transaction.
Replayer = Callable[[AsyncSession, ReplayContext, DeadLetter], Awaitable[None]]

REPLAYERS: dict[str, Replayer] = {}


def replayer(kind: str) -> Callable[[Replayer], Replayer]:
    def register(function: Replayer) -> Replayer:
        REPLAYERS[kind] = function
        return function

    return register


# Modules that register replayers with `@replayer(kind)`; imported on first use so the
# registry does not depend on the features it serves.
REPLAYER_MODULES: list[str] = [
    "koinonia.messaging.replay",
    "koinonia.conversations.replay",
    "koinonia.telnyx.replay",
]


def load_replayers() -> dict[str, Replayer]:
    for module in REPLAYER_MODULES:
        importlib.import_module(module)
    return REPLAYERS
