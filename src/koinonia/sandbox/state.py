"""The sandbox's configuration, in-memory state and fault injection."""

from __future__ import annotations

import asyncio
import os
import random
import secrets
from dataclasses import dataclass, field
from typing import Any

import httpx
from pydantic import BaseModel, Field

from koinonia.sandbox.limits import AcceptanceStats, Throughput


@dataclass(frozen=True)
class SandboxConfig:
    telnyx_api_key: str = "KEY_sandbox"
    telnyx_private_key: str | None = None  # Ed25519 PEM or base64 seed; generated if None
    telnyx_webhook_url: str | None = None
    stripe_api_key: str = "sk_test_sandbox"
    stripe_webhook_secret: str = "whsec_sandbox"  # noqa: S105 - the sandbox's own
    stripe_webhook_url: str | None = None
    public_base_url: str = "http://127.0.0.1:8010"
    delivery_delay_ms: int = 20
    timeout_hold_seconds: float = 30.0  # how long a `timeout_rate` fault holds the answer
    seed: int | None = None  # seeds fault decisions, for reproducible runs
    # Off: accept texts without sending receipts (a benchmark of the sender alone, when
    # the provider's webhook traffic would otherwise share the machine).
    telnyx_receipts: bool = True
    # Pauses between tries of one webhook URL before the failover URL (Telnyx retries for
    # a while): rides out a receiver's short outage such as a database restart.
    webhook_retry_pauses: tuple[float, ...] = (0.05, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)

    @classmethod
    def from_env(cls) -> SandboxConfig:
        env = os.environ
        return cls(
            telnyx_api_key=env.get("SANDBOX_TELNYX_API_KEY", "KEY_sandbox"),
            telnyx_private_key=env.get("SANDBOX_TELNYX_PRIVATE_KEY") or None,
            telnyx_webhook_url=env.get("SANDBOX_TELNYX_WEBHOOK_URL") or None,
            stripe_api_key=env.get("SANDBOX_STRIPE_API_KEY", "sk_test_sandbox"),
            stripe_webhook_secret=env.get("SANDBOX_STRIPE_WEBHOOK_SECRET", "whsec_sandbox"),
            stripe_webhook_url=env.get("SANDBOX_STRIPE_WEBHOOK_URL") or None,
            public_base_url=env.get("SANDBOX_PUBLIC_BASE_URL", "http://127.0.0.1:8010"),
            delivery_delay_ms=int(env.get("SANDBOX_DELIVERY_DELAY_MS", "20")),
            seed=int(env["SANDBOX_SEED"]) if env.get("SANDBOX_SEED") else None,
            timeout_hold_seconds=float(env.get("SANDBOX_TIMEOUT_HOLD_SECONDS", "30")),
            telnyx_receipts=env.get("SANDBOX_TELNYX_RECEIPTS", "on").lower()
            not in ("0", "off", "false", "no"),
        )


class Faults(BaseModel):
    """`POST /sandbox/faults`: what goes wrong, and how often."""

    error_rate: float = Field(0.0, ge=0, le=1)
    status: int = Field(500, ge=400, le=599)
    latency_ms: int = Field(0, ge=0, le=60_000)
    timeout_rate: float = Field(0.0, ge=0, le=1)
    delivery_failure_rate: float = Field(0.0, ge=0, le=1)
    # Telnyx only. A `status` of 401 or 403 answers Telnyx's code (10009, 10010).
    spend_limit_reached: bool = False  # every send: 40333, account-wide
    blocked_numbers: list[str] = Field(default_factory=list)  # sends from these: 40003
    # Accepted and logged, with receipts, but no answer until the client gives up.
    accept_then_hang_rate: float = Field(0.0, ge=0, le=1)
    receipt_delay_ms: int | None = Field(None, ge=0, le=600_000)  # overrides the config's
    duplicate_receipt_rate: float = Field(0.0, ge=0, le=1)  # each receipt sent twice
    reorder_receipts: bool = False  # `message.finalized` before `message.sent`


@dataclass
class SandboxState:
    config: SandboxConfig
    faults: Faults = field(default_factory=Faults)
    rng: random.Random = field(default_factory=random.Random)
    http: httpx.AsyncClient | None = None
    stripe_objects: dict[str, dict[str, Any]] = field(default_factory=dict)
    idempotency: dict[str, tuple[str, int, dict[str, Any]]] = field(default_factory=dict)
    stripe_events: list[dict[str, Any]] = field(default_factory=list)
    telnyx_messages: list[dict[str, Any]] = field(default_factory=list)
    telnyx_profiles: dict[str, dict[str, Any]] = field(default_factory=dict)
    telnyx_numbers: dict[str, dict[str, Any]] = field(default_factory=dict)  # by E.164
    telnyx_orders: dict[str, dict[str, Any]] = field(default_factory=dict)
    tasks: set[asyncio.Task[None]] = field(default_factory=set)
    throughput: Throughput = field(default_factory=Throughput)
    stats: AcceptanceStats = field(default_factory=AcceptanceStats)
    # Webhook POSTs in flight at once. Without a bound, a 10,000-text burst queues 20,000
    # requests inside httpx's pool, whose request assignment is quadratic in that queue.
    delivery_slots: asyncio.Semaphore = field(default_factory=lambda: asyncio.Semaphore(16))

    def __post_init__(self) -> None:
        if self.config.seed is not None:
            self.rng.seed(self.config.seed)

    def roll(self, rate: float) -> bool:
        return rate > 0 and self.rng.random() < rate

    def spawn(self, coroutine: Any) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def telnyx_webhook_urls(self, number: str, profile_id: str | None) -> list[str]:
        """Where Telnyx sends events for `number`: its (or the given) messaging profile's
        webhook and failover URLs, else the sandbox's default URL."""
        if profile_id is None:
            profile_id = self.telnyx_numbers.get(number, {}).get("messaging_profile_id")
        profile = self.telnyx_profiles.get(profile_id or "")
        if profile and profile.get("webhook_url"):
            return [
                url for url in (profile["webhook_url"], profile.get("webhook_failover_url")) if url
            ]
        return [self.config.telnyx_webhook_url] if self.config.telnyx_webhook_url else []


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(12)}"
