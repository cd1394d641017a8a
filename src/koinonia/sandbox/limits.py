"""Telnyx's throughput limits, played: an account-wide and a per-sending-number rate, the
queue Telnyx keeps for the excess, and what the sandbox accepted per second.

One accepted `POST /v2/messages` counts as one message (Telnyx counts segments; the
sandbox keeps it simple).
"""

from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class Limits(BaseModel):
    """`POST /sandbox/limits`: an omitted field takes Telnyx's default, `null` turns it off."""

    model_config = ConfigDict(frozen=True)

    account_per_second: float | None = Field(50.0, gt=0)
    per_number_per_second: float | None = Field(None, gt=0)
    queue_max: int | None = Field(None, ge=0)  # texts waiting per sender; None: unbounded


NO_LIMITS = Limits(account_per_second=None)


@dataclass
class Throughput:
    """When each accepted text leaves, as Telnyx would send it under `limits`."""

    limits: Limits = NO_LIMITS
    _account_next: float = 0.0  # the earliest time the account's next text may leave
    _number_next: dict[str, float] = field(default_factory=dict)
    _waiting: dict[str, deque[float]] = field(default_factory=dict)  # departures ahead

    def admit(self, sender: str, now: float) -> float | None:
        """Seconds until a text from `sender` leaves, or None when its queue is full."""
        waiting = self._waiting.setdefault(sender, deque())
        while waiting and waiting[0] <= now:
            waiting.popleft()
        if self.limits.queue_max is not None and len(waiting) >= self.limits.queue_max:
            return None
        # The account's slots go in arrival order, each number's after its previous text:
        # a text held back by its own number does not hold back other numbers' texts.
        account_slot = max(now, self._account_next)
        if self.limits.account_per_second:
            self._account_next = account_slot + 1 / self.limits.account_per_second
        leaves = max(account_slot, self._number_next.get(sender, now))
        if self.limits.per_number_per_second:
            self._number_next[sender] = leaves + 1 / self.limits.per_number_per_second
        if leaves > now:
            waiting.append(leaves)  # departures of one sender only ever increase
        return leaves - now

    def queued(self, now: float) -> dict[str, int]:
        """Texts each sender has waiting at `now`."""
        counts = {
            sender: sum(1 for leaves in waiting if leaves > now)
            for sender, waiting in self._waiting.items()
        }
        return {sender: n for sender, n in counts.items() if n}


@dataclass
class AcceptanceStats:
    """Texts accepted per whole second of wall-clock time, by arrival: the rate at which
    the client's sends were accepted, whatever the queue simulation does with them."""

    account: Counter[int] = field(default_factory=Counter)
    numbers: dict[str, Counter[int]] = field(default_factory=dict)

    def record(self, sender: str, at: float) -> None:
        second = int(at)
        self.account[second] += 1
        self.numbers.setdefault(sender, Counter())[second] += 1

    def report(self) -> dict[str, Any]:
        def windows(counts: Counter[int]) -> dict[str, Any]:
            return {
                "max_per_second": max(counts.values(), default=0),
                "windows": {str(second): counts[second] for second in sorted(counts)},
            }

        return {
            "account": windows(self.account),
            "numbers": {number: windows(counts) for number, counts in self.numbers.items()},
            "total": self.account.total(),
        }
