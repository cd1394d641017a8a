"""The Telnyx v2 client: one pooled httpx client, typed answers, errors sorted by what
they mean for a retry.

Plain HTTP rather than the SDK: the SDK retries sends by itself, and a send has no
idempotency key, so a retry after a timeout can text a person twice. Here nothing is
retried; callers decide with `SendRefusedError` (nothing was sent: permanent), `SendDeferredError`
(nothing was sent: try again later) and `SendInDoubtError` (it may have been sent: reconcile).
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass
from typing import Any

import httpx
from prometheus_client import Counter, Histogram

from koinonia.observability import LATENCY_BUCKETS
from koinonia.settings import Settings

TELNYX_REQUESTS = Counter(
    "koinonia_telnyx_requests_total", "Telnyx API calls by outcome", ["operation", "outcome"]
)
TELNYX_LATENCY = Histogram(
    "koinonia_telnyx_request_duration_seconds",
    "Telnyx API latency",
    ["operation"],
    buckets=LATENCY_BUCKETS,
)


@dataclass(frozen=True)
class SentMessage:
    id: str
    parts: int
    encoding: str | None
    status: str


class TelnyxError(Exception):
    def __init__(self, detail: str, *, status: int | None = None, code: str | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.status = status
        self.code = code


class SendRefusedError(TelnyxError):
    """A 4xx: Telnyx refused it and nothing was sent; sending it again would not help."""


class SendDeferredError(TelnyxError):
    """Surely not sent (429, refused connection): safe to try again after `retry_after`."""

    def __init__(self, detail: str, *, retry_after: float | None = None, **kwargs: Any) -> None:
        super().__init__(detail, **kwargs)
        self.retry_after = retry_after


class SendInDoubtError(TelnyxError):
    """A timeout or 5xx after the request left: it may have been accepted."""


def _first_error(response: httpx.Response) -> tuple[str | None, str]:
    try:
        errors = response.json().get("errors") or []
        first = errors[0]
        return str(first.get("code")), str(first.get("detail") or first.get("title"))
    except (ValueError, AttributeError, IndexError, TypeError):
        return None, response.reason_phrase or f"HTTP {response.status_code}"


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("Retry-After")
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


# httpx's pool does work proportional to its connection count on every request (it
# checks each idle connection's socket): one client with as many connections as sends in
# flight spent most of a worker's CPU there. Several small clients used in turn do not.
CONNECTIONS_PER_CLIENT = 8


class TelnyxClient:
    """Telnyx over a few small pooled httpx clients used in turn (see above)."""

    def __init__(self, settings: Settings, *, max_connections: int | None = None) -> None:
        # Headroom over the sends in flight: turns are even, finishing times are not.
        connections = max_connections or max(16, settings.send_concurrency * 3 // 2)
        per_client = min(CONNECTIONS_PER_CLIENT, connections)
        shards = -(-connections // per_client)
        self._clients = [
            httpx.AsyncClient(
                base_url=str(settings.telnyx_base_url).rstrip("/"),
                headers={
                    "Authorization": f"Bearer {settings.telnyx_api_key.get_secret_value()}",
                    "Accept": "application/json",
                },
                timeout=httpx.Timeout(
                    settings.telnyx_timeout, connect=min(3.0, settings.telnyx_timeout)
                ),
                # Idle connections are dropped before a server's usual 5 s keep-alive ends,
                # so a send is not written to a socket the server is closing (an
                # ambiguous ReadError instead of a clean answer).
                limits=httpx.Limits(
                    max_connections=per_client,
                    max_keepalive_connections=per_client,
                    keepalive_expiry=3.0,
                ),
            )
            for _ in range(shards)
        ]
        self._turn = itertools.cycle(self._clients)

    @property
    def _http(self) -> httpx.AsyncClient:
        return next(self._turn)

    async def aclose(self) -> None:
        for client in self._clients:
            await client.aclose()

    async def send_message(
        self,
        *,
        sender: str,
        to: str,
        text: str,
        webhook_url: str | None = None,
        messaging_profile_id: str | None = None,
    ) -> SentMessage:
        body: dict[str, Any] = {"from": sender, "to": to, "text": text, "type": "SMS"}
        if webhook_url:
            body["webhook_url"] = webhook_url
        if messaging_profile_id:
            body["messaging_profile_id"] = messaging_profile_id
        started = time.perf_counter()
        try:
            response = await self._http.post("/v2/messages", json=body)
        except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as error:
            # The request never left this machine.
            TELNYX_REQUESTS.labels("send", "deferred").inc()
            raise SendDeferredError(f"not connected: {type(error).__name__}") from None
        except httpx.HTTPError as error:
            TELNYX_REQUESTS.labels("send", "in_doubt").inc()
            raise SendInDoubtError(f"no answer: {type(error).__name__}") from None
        finally:
            TELNYX_LATENCY.labels("send").observe(time.perf_counter() - started)
        status = response.status_code
        if status == 200:
            TELNYX_REQUESTS.labels("send", "sent").inc()
            data = response.json()["data"]
            return SentMessage(
                id=str(data["id"]),
                parts=int(data.get("parts") or 1),
                encoding=data.get("encoding"),
                status=str((data.get("to") or [{}])[0].get("status", "queued")),
            )
        code, detail = _first_error(response)
        if status == 429:
            TELNYX_REQUESTS.labels("send", "deferred").inc()
            raise SendDeferredError(
                detail, retry_after=_retry_after(response), status=status, code=code
            )
        if status >= 500:
            TELNYX_REQUESTS.labels("send", "in_doubt").inc()
            raise SendInDoubtError(detail, status=status, code=code)
        TELNYX_REQUESTS.labels("send", "refused").inc()
        raise SendRefusedError(detail, status=status, code=code)

    async def request(
        self, method: str, path: str, operation: str, *, json: Any = None, params: Any = None
    ) -> dict[str, Any]:
        """Any other call (numbers, profiles, lookups): the answer's `data`, or TelnyxError."""
        started = time.perf_counter()
        try:
            response = await self._http.request(method, path, json=json, params=params)
        except httpx.HTTPError as error:
            TELNYX_REQUESTS.labels(operation, "error").inc()
            raise TelnyxError(f"{operation}: {type(error).__name__}") from None
        finally:
            TELNYX_LATENCY.labels(operation).observe(time.perf_counter() - started)
        if response.status_code >= 400:
            TELNYX_REQUESTS.labels(operation, "error").inc()
            code, detail = _first_error(response)
            raise TelnyxError(detail, status=response.status_code, code=code)
        TELNYX_REQUESTS.labels(operation, "ok").inc()
        payload: dict[str, Any] = response.json()
        return payload

    async def get_message(self, message_id: str) -> dict[str, Any]:
        data: dict[str, Any] = (
            await self.request("GET", f"/v2/messages/{message_id}", "get_message")
        )["data"]
        return data

    async def balance(self) -> dict[str, Any]:
        return await self.request("GET", "/v2/balance", "balance")
