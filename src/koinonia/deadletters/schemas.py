"""Bodies of the dead-letter queue endpoints (operators only)."""

from __future__ import annotations

import uuid
from typing import Annotated, Any, Literal, Self

from pydantic import Field, model_validator

from koinonia.http.schemas import RequestModel, ResponseModel, Timestamp

MAX_REPLAY_BATCH = 1000

ReplayState = Literal["pending", "replaying", "replayed", "replay_failed"]


class DeadLetterOut(ResponseModel):
    id: int
    kind: str = Field(examples=["sms.send"])
    church_id: uuid.UUID | None
    payload: dict[str, Any]
    last_error: str
    error_code: str | None
    attempts: int
    first_failed_at: Timestamp
    last_failed_at: Timestamp
    replay_state: ReplayState
    replayed_at: Timestamp | None
    created_at: Timestamp


class ReplayRequest(RequestModel):
    """Either `ids`, or a `kind` (optionally with `church_id`) selecting pending entries."""

    ids: list[Annotated[int, Field(ge=1, le=2**63 - 1)]] | None = Field(
        None, min_length=1, max_length=MAX_REPLAY_BATCH
    )
    kind: str | None = Field(None, min_length=1, max_length=60, examples=["sms.send"])
    church_id: uuid.UUID | None = None

    @model_validator(mode="after")
    def _one_selector(self) -> Self:
        if (self.ids is None) == (self.kind is None):
            raise ValueError("send either 'ids' or 'kind'")
        if self.ids is not None and self.church_id is not None:
            raise ValueError("'church_id' filters by 'kind'; it cannot be used with 'ids'")
        return self


class ReplayFailure(ResponseModel):
    id: int
    detail: str


class ReplayResult(ResponseModel):
    replayed: int
    failed: list[ReplayFailure]
