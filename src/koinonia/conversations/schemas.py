"""Shapes of `/conversations`."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from koinonia.messaging.schemas import MAX_BODY


class ConversationMember(BaseModel):
    id: uuid.UUID
    first_name: str
    last_name: str
    phone: str = Field(description="E.164")
    opted_out: bool
    is_unknown: bool


class LastMessage(BaseModel):
    body: str
    direction: Literal["inbound", "outbound"]


class ConversationOut(BaseModel):
    id: uuid.UUID
    member: ConversationMember
    status: Literal["open", "closed", "archived"]
    unread_count: int
    last_message_at: datetime
    last_message: LastMessage | None
    created_at: datetime


class ConversationMessageOut(BaseModel):
    id: str
    direction: Literal["inbound", "outbound"]
    body: str
    status: str
    kind: str
    error_code: str | None
    created_at: datetime


class StartConversation(BaseModel):
    model_config = ConfigDict(extra="forbid")
    member_id: uuid.UUID
    body: str | None = Field(None, min_length=1, max_length=MAX_BODY)


class ReplyIn(BaseModel):
    model_config = ConfigDict(
        extra="forbid", json_schema_extra={"examples": [{"body": "See you Sunday!"}]}
    )
    body: str = Field(min_length=1, max_length=MAX_BODY)


class ConversationPatch(BaseModel):
    model_config = ConfigDict(extra="forbid")
    status: Literal["open", "closed", "archived"] | None = None
    read: bool | None = Field(None, description="true marks every message read")
