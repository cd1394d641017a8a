"""Delivery receipts (`message.sent`, `message.finalized`) applied in bulk.

A receipt finds its row by our webhook reference when it carries one, else by Telnyx's
message id through an index. A row only moves forward (queued < sending < sent < final),
so duplicates and out-of-order events (`finalized` before `sent`) change nothing twice.
"""

from __future__ import annotations

from collections import Counter as Tally
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from prometheus_client import Counter
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from koinonia.messaging.counters import RANK_SQL, apply_transitions
from koinonia.messaging.refs import RowRef

DELIVERIES = Counter(
    "koinonia_sms_receipts_total", "Delivery receipts applied, by resulting status", ["status"]
)

# Telnyx `to[].status` → our recipient status, and whether it is final.
STATUS_OF = {
    "queued": ("sent", False),
    "sending": ("sent", False),
    "sent": ("sent", False),
    "delivered": ("delivered", True),
    "sending_failed": ("failed", True),
    "delivery_failed": ("undelivered", True),
    "delivery_unconfirmed": ("sent", True),  # the carrier never said; it stays `sent`
}
RANK = {
    "queued": 0,
    "sending": 1,
    "sent": 2,
    "unconfirmed": 2,
    "delivered": 3,
    "failed": 3,
    "undelivered": 3,
}


@dataclass(frozen=True)
class Receipt:
    provider_id: str
    status: str  # ours
    final: bool
    error_code: str | None
    error_detail: str | None
    parts: int | None
    ref: RowRef | None


def parse(event: dict[str, Any], ref: RowRef | None) -> Receipt | None:
    payload = event.get("data", {}).get("payload") or {}
    recipients = payload.get("to") or [{}]
    telnyx_status = str(recipients[0].get("status", ""))
    mapped = STATUS_OF.get(telnyx_status)
    provider_id = payload.get("id")
    if mapped is None or not provider_id:
        return None
    errors = payload.get("errors") or []
    code = str(errors[0].get("code")) if errors else None
    detail = str(errors[0].get("detail") or errors[0].get("title") or "")[:300] if errors else None
    if telnyx_status == "delivery_unconfirmed":
        code = code or "delivery_unconfirmed"
    parts = payload.get("parts")
    return Receipt(
        str(provider_id),
        mapped[0],
        mapped[1],
        code,
        detail,
        int(parts) if isinstance(parts, int) else None,
        ref,
    )


APPLY_SQL = f"""
WITH ev AS (
  SELECT * FROM unnest(
    CAST(:ids AS bigint[]), CAST(:created AS timestamptz[]), CAST(:statuses AS text[]),
    CAST(:ranks AS int[]), CAST(:finals AS bool[]), CAST(:codes AS text[]),
    CAST(:details AS text[]), CAST(:provider_ids AS text[])
  ) AS t(id, created_at, status, rank, final, code, detail, provider_id)
),
old AS (
  SELECT r.id, r.created_at, r.status FROM message_recipients r
  JOIN ev ON ev.id = r.id AND ev.created_at = r.created_at
  FOR UPDATE OF r
)
UPDATE message_recipients r SET
  status = CASE WHEN ev.rank > {RANK_SQL.format(col="old.status")} THEN ev.status
                ELSE r.status END,
  provider_message_id = coalesce(r.provider_message_id, ev.provider_id),
  error_code = coalesce(ev.code, r.error_code),
  error_detail = coalesce(ev.detail, r.error_detail),
  in_doubt_since = NULL,
  next_attempt_at = NULL,
  sent_at = coalesce(r.sent_at, now()),
  finalized_at = CASE WHEN ev.final THEN coalesce(r.finalized_at, now()) ELSE r.finalized_at END,
  updated_at = now()
FROM ev, old
WHERE r.id = ev.id AND r.created_at = ev.created_at
  AND old.id = r.id AND old.created_at = r.created_at AND old.status <> 'skipped'
  AND (ev.rank > {RANK_SQL.format(col="old.status")}
       OR r.provider_message_id IS NULL OR (ev.final AND r.finalized_at IS NULL))
RETURNING r.message_id, old.status AS old_status, r.status AS new_status
"""  # noqa: S608 - constant SQL


async def apply_receipts(session: AsyncSession, receipts: list[Receipt]) -> int:
    """Apply a batch of broadcast receipts; answers how many rows changed."""
    located = await _locate(session, receipts)
    # One update per row: the most advanced receipt of the batch wins.
    best: dict[tuple[int, datetime], Receipt] = {}
    for key, receipt in located:
        current = best.get(key)
        if current is None or (RANK[receipt.status], receipt.final) > (
            RANK[current.status],
            current.final,
        ):
            best[key] = receipt
    if not best:
        return 0
    keys = list(best)
    rows = await session.execute(
        text(APPLY_SQL),
        {
            "ids": [k[0] for k in keys],
            "created": [k[1] for k in keys],
            "statuses": [best[k].status for k in keys],
            "ranks": [RANK[best[k].status] for k in keys],
            "finals": [best[k].final for k in keys],
            "codes": [best[k].error_code for k in keys],
            "details": [best[k].error_detail for k in keys],
            "provider_ids": [best[k].provider_id for k in keys],
        },
    )
    changed = [(r.message_id, r.old_status, r.new_status) for r in rows]
    for _, _, new in changed:
        DELIVERIES.labels(new).inc()
    tally = Tally(changed)
    await apply_transitions(session, [(m, o, n, k) for (m, o, n), k in tally.items()])
    return len(changed)


async def _locate(
    session: AsyncSession, receipts: list[Receipt]
) -> list[tuple[tuple[int, datetime], Receipt]]:
    found: list[tuple[tuple[int, datetime], Receipt]] = []
    by_provider: dict[str, list[Receipt]] = {}
    for receipt in receipts:
        if receipt.ref is not None:
            found.append(((receipt.ref.id, receipt.ref.created_at), receipt))
        else:
            by_provider.setdefault(receipt.provider_id, []).append(receipt)
    if by_provider:
        rows = await session.execute(
            text(
                "SELECT id, created_at, provider_message_id FROM message_recipients "
                "WHERE provider_message_id = ANY(:ids)"
            ),
            {"ids": list(by_provider)},
        )
        for row in rows:
            for receipt in by_provider[row.provider_message_id]:
                found.append(((int(row.id), row.created_at), receipt))
    return found
