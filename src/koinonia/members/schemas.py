"""Bodies of the members endpoints."""

from __future__ import annotations

import uuid
from typing import Literal

from pydantic import EmailStr, Field

from koinonia.http.schemas import RequestModel, ResponseModel, Timestamp

PhoneInput = Field(
    min_length=1,
    max_length=32,
    examples=["(415) 555-0132", "+14155550132"],
    description="Any common format; read with the church's default region, stored as E.164",
)


class MemberCreate(RequestModel):
    first_name: str = Field("", max_length=100, examples=["Ada"])
    last_name: str = Field("", max_length=100, examples=["Lovelace"])
    phone: str = PhoneInput
    email: EmailStr | None = None
    opted_out: bool = False
    group_ids: list[uuid.UUID] = Field(default_factory=list, max_length=100)


class MemberUpdate(RequestModel):
    first_name: str | None = Field(None, max_length=100)
    last_name: str | None = Field(None, max_length=100)
    phone: str | None = Field(None, min_length=1, max_length=32)
    email: EmailStr | None = None
    opted_out: bool | None = None


class MemberOut(ResponseModel):
    id: uuid.UUID
    first_name: str
    last_name: str
    phone: str = Field(description="E.164")
    email: str | None
    opted_out: bool
    opted_out_at: Timestamp | None
    opted_out_source: str | None
    is_unknown: bool
    created_at: Timestamp
    updated_at: Timestamp


class ImportRowError(ResponseModel):
    row: int
    field: str
    message: str


class ImportOut(ResponseModel):
    id: uuid.UUID
    status: Literal["pending", "running", "completed", "failed"]
    filename: str
    on_duplicate: str
    group_id: uuid.UUID | None
    processed: int
    created: int
    updated: int
    skipped: int
    error_count: int = Field(description="All row errors; `errors` lists the first 1,000")
    errors: list[ImportRowError]
    failure: str | None = Field(description="Why the whole file failed, if it did")
    created_at: Timestamp
    started_at: Timestamp | None
    finished_at: Timestamp | None


class ConsentEventOut(ResponseModel):
    """One change of the member's consent to be texted."""

    id: int
    at: Timestamp
    opted_out: bool = Field(description="The state after the change")
    source: Literal["keyword", "api", "import", "provider", "renormalize", "erase"] = Field(
        description="keyword: the member texted STOP/START; api: staff or an API key "
        "(`actor_id`); provider: the carrier refused a send (40300); renormalize: copied "
        "from a twin phone; erase: the opt-out an erased member keeps"
    )
    actor_id: uuid.UUID | None


class ExportGroup(ResponseModel):
    id: uuid.UUID
    name: str
    added_at: Timestamp


class ExportMember(MemberOut):
    deleted_at: Timestamp | None
    review_reason: str | None


class ExportBroadcastText(ResponseModel):
    """One broadcast addressed to the member (a recipient row)."""

    message_id: uuid.UUID
    recipient_id: int
    created_at: Timestamp
    status: str
    skip_reason: str | None
    sent_at: Timestamp | None
    segments: int
    provider_message_id: str | None
    template: str = Field(description="The broadcast's body as written, with merge fields")
    body: str = Field(description="The body rendered for this member (their current names)")


class ExportConversationText(ResponseModel):
    id: int
    created_at: Timestamp
    direction: Literal["inbound", "outbound"]
    kind: str
    status: str
    body: str
    segments: int
    provider_message_id: str | None


class ExportConversation(ResponseModel):
    id: uuid.UUID
    status: str
    created_at: Timestamp
    texts: list[ExportConversationText] = Field(description="Oldest first")


class MemberExport(ResponseModel):
    """Everything held on one member (`GET /members/{id}/export`)."""

    exported_at: Timestamp
    church_id: uuid.UUID
    member: ExportMember
    groups: list[ExportGroup]
    consent_history: list[ConsentEventOut] = Field(description="Oldest first")
    broadcasts: list[ExportBroadcastText] = Field(description="Oldest first")
    conversation: ExportConversation | None


class ErasureOut(ResponseModel):
    """What `POST /members/{id}/erase` removed (counts only: nothing personal is left)."""

    member_id: uuid.UUID
    erased_at: Timestamp
    suppression_kept: bool = Field(
        description="The member had opted out: a keyed hash of the phone is kept with the "
        "opt-out time, so the phone stays suppressed (a later import or creation comes in "
        "opted out)"
    )
    group_memberships: int
    conversation_texts: int
    broadcast_recipients: int
    provider_events: int
