"""What a text costs: Telnyx's reported parts, capped at what was reserved.

The estimate reserves the most segments a recipient's text can take (with Telnyx's
character set); a receipt that reports more parts than that is counted and logged for
the operators, never debited beyond the reservation.
"""

from __future__ import annotations

import uuid

import structlog
from prometheus_client import Counter

log = structlog.get_logger(__name__)

SEGMENTS_OVER_RESERVATION = Counter(
    "koinonia_segments_over_reservation_total",
    "Segments Telnyx reported beyond what was reserved (not billed to the church)",
)


def note_excess(church_id: uuid.UUID, segments: int) -> None:
    if segments <= 0:
        return
    SEGMENTS_OVER_RESERVATION.inc(segments)
    log.warning("segments_over_reservation", church_id=str(church_id), segments=segments)
