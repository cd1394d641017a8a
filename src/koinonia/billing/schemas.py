"""Bodies of the billing endpoints."""

from __future__ import annotations

from pydantic import Field

from koinonia.http.schemas import RequestModel, ResponseModel, Timestamp


class PlanOut(ResponseModel):
    id: str
    name: str
    monthly_price_cents: int
    included_segments: int


class SubscriptionOut(ResponseModel):
    plan: str
    status: str = Field(description="trialing, active, past_due, canceled, …")
    can_send: bool
    period_start: Timestamp
    period_end: Timestamp
    cancel_at_period_end: bool
    stripe_customer_id: str | None


class UsageOut(ResponseModel):
    used: int
    included: int
    remaining: int
    period_start: Timestamp
    period_end: Timestamp


class CheckoutRequest(RequestModel):
    plan: str = Field(min_length=1, max_length=40, examples=["starter"])


class RedirectOut(ResponseModel):
    url: str
    id: str | None = None


class WebhookAck(ResponseModel):
    received: bool
    duplicate: bool
