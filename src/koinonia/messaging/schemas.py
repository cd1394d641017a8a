"""Request and response shapes of `/messages`."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

MAX_BODY = 1600  # Telnyx sends at most 10 segments


class MessageRequest(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "body": "Hi {{first_name}}, choir practice moves to 7pm Thursday.",
                    "group_ids": ["0b6f7c52-1d0e-4f55-9d55-3b8f1b0f3a10"],
                    "member_ids": [],
                }
            ]
        },
    )

    body: str | None = Field(None, min_length=1, max_length=MAX_BODY)
    template_id: uuid.UUID | None = None
    group_ids: list[uuid.UUID] = Field(default_factory=list, max_length=100)
    member_ids: list[uuid.UUID] = Field(default_factory=list, max_length=1000)
    scheduled_at: datetime | None = None
    urgent: bool = Field(
        False,
        description="Owners and admins only: send even outside the church's sending window",
    )

    @model_validator(mode="after")
    def _one_body(self) -> MessageRequest:
        if (self.body is None) == (self.template_id is None):
            raise ValueError("give either body or template_id")
        if not self.group_ids and not self.member_ids:
            raise ValueError("give group_ids or member_ids (or both)")
        if self.scheduled_at is not None and self.scheduled_at.tzinfo is None:
            raise ValueError("scheduled_at needs a time zone (RFC 3339)")
        return self


class PreviewOut(BaseModel):
    segments: int
    encoding: Literal["GSM-7", "UCS-2"]
    characters: int
    recipients: int
    skipped: int = Field(description="Audience members who will not be texted (opted out)")
    body: str = Field(description="The text as rendered for the first recipient")
    gsm_suggestion: str | None = Field(
        None, description="The same text with smart punctuation replaced, when that saves UCS-2"
    )


class Counts(BaseModel):
    queued: int
    sent: int
    delivered: int
    failed: int
    skipped: int


class MessageOut(BaseModel):
    id: uuid.UUID
    status: str
    body: str
    segments: int
    encoding: str
    characters: int
    recipients_total: int
    counts: Counts
    group_ids: list[uuid.UUID]
    member_ids: list[uuid.UUID]
    template_id: uuid.UUID | None
    scheduled_at: datetime | None
    started_at: datetime | None
    completed_at: datetime | None
    cancelled_at: datetime | None
    starts_at: datetime | None = Field(
        None,
        description="When a held broadcast (scheduled, or outside the sending window) starts "
        "or resumes",
    )
    urgent: bool = False
    paused_reason: str | None = Field(
        None,
        description="Why the provider stopped this broadcast's sender (the account or the "
        "sending number); it resumes by itself when the provider accepts again",
    )
    created_at: datetime


class RecipientOut(BaseModel):
    id: str
    member_id: uuid.UUID
    status: str
    skip_reason: str | None
    segments: int
    attempts: int
    provider_message_id: str | None
    error_code: str | None
    error_detail: str | None
    sent_at: datetime | None
    finalized_at: datetime | None
    in_doubt: bool
