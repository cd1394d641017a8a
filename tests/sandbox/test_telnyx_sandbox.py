"""The Telnyx half of the sandbox: auth, error shapes, faults, and signed webhooks that
verify with the published Ed25519 key, as Telnyx signs them."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from fastapi import FastAPI, Request

from koinonia.sandbox.server import create_sandbox_app
from koinonia.sandbox.state import SandboxConfig
from tests.support.servers import LiveServer, free_port

AUTH = {"Authorization": "Bearer KEY_sandbox"}


class Receiver:
    def __init__(self) -> None:
        self.events: list[tuple[dict[str, str], bytes]] = []
        self.app = FastAPI()

        @self.app.post("/hook")
        async def hook(request: Request) -> dict[str, bool]:
            self.events.append((dict(request.headers), await request.body()))
            return {"ok": True}


@pytest.fixture(scope="module")
def servers() -> Iterator[tuple[LiveServer, Receiver]]:
    receiver = Receiver()
    with LiveServer(lambda: receiver.app) as hook_server:
        port = free_port()
        config = SandboxConfig(
            telnyx_webhook_url=f"{hook_server.url}/hook",
            delivery_delay_ms=5,
            public_base_url=f"http://127.0.0.1:{port}",
        )
        with LiveServer(lambda: create_sandbox_app(config), port=port) as sandbox:
            yield sandbox, receiver


async def _wait_for(receiver: Receiver, n: int) -> None:
    for _ in range(200):
        if len(receiver.events) >= n:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"expected {n} webhooks, got {len(receiver.events)}")


def _verify(public_key_b64: str, headers: dict[str, str], body: bytes) -> dict[str, Any]:
    key = Ed25519PublicKey.from_public_bytes(base64.b64decode(public_key_b64))
    signed = f"{headers['telnyx-timestamp']}|".encode() + body
    key.verify(base64.b64decode(headers["telnyx-signature-ed25519"]), signed)
    assert abs(int(headers["telnyx-timestamp"]) - time.time()) < 300
    event: dict[str, Any] = json.loads(body)
    return event


async def test_send_then_signed_sent_and_finalized(servers: tuple[LiveServer, Receiver]) -> None:
    sandbox, receiver = servers
    receiver.events.clear()
    async with httpx.AsyncClient(base_url=sandbox.url) as http:
        public = (await http.get("/sandbox/public-key")).json()["public_key"]
        await http.delete("/sandbox/messages")
        sent = await http.post(
            "/v2/messages",
            headers=AUTH,
            json={"from": "+14155550100", "to": "+14155550123", "text": "Praise 🙏"},
        )
        assert sent.status_code == 200
        message = sent.json()["data"]
        assert message["to"][0]["status"] == "queued"
        assert (message["parts"], message["encoding"]) == (1, "UCS-2")
        await _wait_for(receiver, 2)
        events = [_verify(public, h, b)["data"] for h, b in receiver.events]
        assert [e["event_type"] for e in events] == ["message.sent", "message.finalized"]
        assert events[1]["payload"]["id"] == message["id"]
        assert events[1]["payload"]["to"][0]["status"] == "delivered"
        log = (await http.get("/sandbox/messages", params={"to": "+14155550123"})).json()
        assert [m["id"] for m in log["data"]] == [message["id"]]
        fetched = await http.get(f"/v2/messages/{message['id']}", headers=AUTH)
        assert fetched.json()["data"]["to"][0]["status"] == "delivered"
    # Tampering breaks the signature.
    headers, body = receiver.events[0]
    with pytest.raises(InvalidSignature):
        _verify(public, headers, body + b" ")


async def test_errors_and_faults(servers: tuple[LiveServer, Receiver]) -> None:
    sandbox, _ = servers
    async with httpx.AsyncClient(base_url=sandbox.url) as http:
        body = {"from": "+14155550100", "to": "+14155550123", "text": "hi"}
        unauth = await http.post("/v2/messages", json=body)
        assert unauth.status_code == 401 and unauth.json()["errors"][0]["code"] == "10009"
        bad = await http.post("/v2/messages", headers=AUTH, json=body | {"to": "4155550123"})
        assert bad.status_code == 422 and bad.json()["errors"][0]["source"]["pointer"] == "/to"
        stopped = await http.post("/v2/messages", headers=AUTH, json=body | {"to": "+14155550000"})
        assert stopped.json()["errors"][0]["code"] == "40300"
        await http.post("/sandbox/faults", json={"error_rate": 1, "status": 429})
        limited = await http.post("/v2/messages", headers=AUTH, json=body)
        assert limited.status_code == 429 and limited.headers["Retry-After"] == "1"
        await http.post("/sandbox/faults", json={"error_rate": 1, "status": 503})
        assert (await http.post("/v2/messages", headers=AUTH, json=body)).status_code == 503
        await http.delete("/sandbox/faults")
        assert (await http.post("/v2/messages", headers=AUTH, json=body)).status_code == 200
        assert (await http.get("/v2/balance", headers=AUTH)).json()["data"]["currency"] == "USD"


async def test_inbound_is_signed_message_received(servers: tuple[LiveServer, Receiver]) -> None:
    sandbox, receiver = servers
    receiver.events.clear()
    async with httpx.AsyncClient(base_url=sandbox.url) as http:
        public = (await http.get("/sandbox/public-key")).json()["public_key"]
        answer = await http.post(
            "/sandbox/inbound", json={"from": "+14155550123", "to": "+14155550100", "text": "STOP"}
        )
    assert answer.status_code == 202 and answer.json()["delivered_status"] == 200
    event = _verify(public, *receiver.events[-1])["data"]
    assert event["event_type"] == "message.received"
    assert event["payload"]["direction"] == "inbound"
    assert event["payload"]["from"]["phone_number"] == "+14155550123"
    assert event["payload"]["to"][0]["phone_number"] == "+14155550100"
    assert event["payload"]["text"] == "STOP"
