"""`suppressions`: phones that opted out of a sending number ("STOP always wins").

Keyed by the sending number and a keyed hash of the E.164 phone that does not depend on
the church (see `messaging/suppressions.py`), so it is written on the webhook's request
path, before anything knows which church or member the text belongs to.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import DateTime, LargeBinary, Text
from sqlalchemy.orm import Mapped, mapped_column

from koinonia.db import Base


class Suppression(Base):
    __tablename__ = "suppressions"

    sender_number: Mapped[str] = mapped_column(Text, primary_key=True)
    phone_hmac: Mapped[bytes] = mapped_column(LargeBinary, primary_key=True)
    # The time of the opt-out event (Telnyx `occurred_at`): a later opt-in lifts it, an
    # earlier one (delivered or applied late) does not.
    opted_out_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    source: Mapped[str] = mapped_column(Text)  # keyword | provider | admin | import
