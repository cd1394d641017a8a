"""Plans come from configuration (`BILLING_PLANS`)."""

from __future__ import annotations

from dataclasses import dataclass

from koinonia.settings import Settings


@dataclass(frozen=True, slots=True)
class Plan:
    id: str
    name: str
    price_id: str
    monthly_price_cents: int
    included_segments: int


def plans(settings: Settings) -> list[Plan]:
    found = []
    for entry in settings.billing_plans.split(","):
        plan_id, price_id, cents, segments = entry.strip().split(":")
        found.append(Plan(plan_id, plan_id.title(), price_id, int(cents), int(segments)))
    return found


def plan_by_id(settings: Settings, plan_id: str) -> Plan | None:
    return next((p for p in plans(settings) if p.id == plan_id), None)


def plan_by_price(settings: Settings, price_id: str) -> Plan | None:
    return next((p for p in plans(settings) if p.price_id == price_id), None)
