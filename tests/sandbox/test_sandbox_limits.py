"""Telnyx's limits and faults as the sandbox plays them, over real loopback HTTP: queued
excess and `40318`, acceptance stats, strict E.164, account and number refusals, an
accepted send whose answer never comes, and duplicated or reordered receipts."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, Request

from koinonia.sandbox.server import create_sandbox_app
from koinonia.sandbox.state import SandboxConfig
from tests.support.servers import LiveServer, free_port

AUTH = {"Authorization": "Bearer KEY_sandbox"}
A, B = "+14155550100", "+14155550101"
SMS = {"from": A, "to": "+14155550123", "text": "hi"}


class Receiver:
    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self.app = FastAPI()

        @self.app.post("/hook")
        async def hook(request: Request) -> dict[str, bool]:
            self.events.append(json.loads(await request.body())["data"])
            return {"ok": True}

    def for_message(self, message_id: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e["payload"]["id"] == message_id]


async def eventually(condition: Callable[[], bool], within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


def _serve(receiver_url: str, **config: Any) -> LiveServer:
    port = free_port()
    settings = SandboxConfig(
        telnyx_webhook_url=f"{receiver_url}/hook",
        delivery_delay_ms=5,
        public_base_url=f"http://127.0.0.1:{port}",
        **config,
    )
    return LiveServer(lambda: create_sandbox_app(settings), port=port)


@pytest.fixture(scope="module")
def servers() -> Iterator[tuple[LiveServer, Receiver]]:
    receiver = Receiver()
    with (
        LiveServer(lambda: receiver.app) as hook_server,
        _serve(hook_server.url, timeout_hold_seconds=30) as sandbox,
    ):
        yield sandbox, receiver


@pytest.fixture
async def http(servers: tuple[LiveServer, Receiver]) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=servers[0].url, timeout=10) as client:
        for path in ("faults", "limits", "stats", "messages"):
            await client.delete(f"/sandbox/{path}")
        yield client
        for path in ("faults", "limits"):
            await client.delete(f"/sandbox/{path}")


async def _send(http: httpx.AsyncClient, **fields: str) -> httpx.Response:
    return await http.post("/v2/messages", headers=AUTH, json=SMS | fields)


def _code(response: httpx.Response) -> tuple[int, str]:
    return response.status_code, response.json()["errors"][0]["code"]


async def test_no_limits_by_default(http: httpx.AsyncClient) -> None:
    assert (await http.get("/sandbox/limits")).json() == {
        "account_per_second": None,
        "per_number_per_second": None,
        "queue_max": None,
    }
    assert [(await _send(http)).status_code for _ in range(20)] == [200] * 20
    assert (await http.get("/sandbox/stats")).json()["queued"] == {}


async def test_excess_is_queued_then_a_full_queue_answers_40318(
    http: httpx.AsyncClient, servers: tuple[LiveServer, Receiver]
) -> None:
    # One text per 10 s per number: the first leaves now, three wait, the fifth is refused.
    limits = {"account_per_second": None, "per_number_per_second": 0.1, "queue_max": 3}
    assert (await http.post("/sandbox/limits", json=limits)).json() == limits
    sent = [await _send(http) for _ in range(4)]
    assert [r.status_code for r in sent] == [200] * 4
    full = await _send(http)
    assert _code(full) == (400, "40318")
    assert full.json()["errors"][0]["source"] == {"pointer": "/from"}
    assert (await _send(http, **{"from": B})).status_code == 200  # another number's queue

    stats = (await http.get("/sandbox/stats")).json()
    assert stats["total"] == 5
    assert sum(stats["numbers"][A]["windows"].values()) == 4
    assert sum(stats["numbers"][B]["windows"].values()) == 1
    assert stats["queued"] == {A: 3}
    log = (await http.get("/sandbox/messages")).json()["data"]
    assert len(log) == 5

    # The first text left at once and has its receipts; the queued ones have none yet.
    _, receiver = servers
    first, queued = sent[0].json()["data"]["id"], sent[1].json()["data"]["id"]
    await eventually(lambda: len(receiver.for_message(first)) == 2)
    assert receiver.for_message(queued) == []

    await http.delete("/sandbox/limits")
    assert (await _send(http)).status_code == 200
    assert (await http.get("/sandbox/stats")).json()["queued"] == {}


async def test_the_account_limit_queues_every_number(http: httpx.AsyncClient) -> None:
    await http.post(
        "/sandbox/limits",
        json={"account_per_second": 0.1, "per_number_per_second": None, "queue_max": 1},
    )
    assert [(await _send(http)).status_code for _ in range(2)] == [200, 200]
    assert _code(await _send(http)) == (400, "40318")
    # B's first text waits behind the account's rate too, so B's queue fills at once.
    assert (await _send(http, **{"from": B})).status_code == 200
    assert _code(await _send(http, **{"from": B})) == (400, "40318")
    assert (await http.get("/sandbox/stats")).json()["queued"] == {A: 1, B: 1}


async def test_limits_default_to_telnyx_and_are_validated(http: httpx.AsyncClient) -> None:
    assert (await http.post("/sandbox/limits", json={})).json() == {
        "account_per_second": 50.0,
        "per_number_per_second": None,
        "queue_max": None,
    }
    assert (await http.get("/sandbox/limits")).json()["account_per_second"] == 50.0
    assert (await http.post("/sandbox/limits", json={"account_per_second": 0})).status_code == 422
    assert (await http.post("/sandbox/limits", json={"queue_max": -1})).status_code == 422


async def test_stats_count_acceptances_per_second_by_number(http: httpx.AsyncClient) -> None:
    for _ in range(6):
        assert (await _send(http)).status_code == 200
    for _ in range(2):
        assert (await _send(http, **{"from": B})).status_code == 200
    assert (await _send(http, to="+14155550000")).status_code == 400  # refused: not counted
    stats = (await http.get("/sandbox/stats")).json()
    assert stats["total"] == 8
    account = stats["account"]
    assert sum(account["windows"].values()) == 8
    assert account["max_per_second"] == max(account["windows"].values())
    assert all(second.isdigit() for second in account["windows"])
    assert sum(stats["numbers"][A]["windows"].values()) == 6
    assert sum(stats["numbers"][B]["windows"].values()) == 2
    assert stats["numbers"][B]["max_per_second"] <= 2

    await http.delete("/sandbox/stats")
    cleared = (await http.get("/sandbox/stats")).json()
    assert cleared["total"] == 0 and cleared["account"]["max_per_second"] == 0


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("to", "+١٤١٥٥٥٥٠١٢٣"),  # Arabic-Indic digits: `\d` would let them through
        ("to", "+１４１５５５５０１２３"),  # fullwidth digits
        ("to", "+14155550123\n"),
        ("to", "+04155550123"),
        ("to", "+1415555"),
        ("from", "14155550100"),
        ("from", "+1415555010012345"),
    ],
)
async def test_e164_is_strict_and_ascii(http: httpx.AsyncClient, field: str, value: str) -> None:
    answer = await _send(http, **{field: value})
    assert _code(answer) == (422, "10016")
    assert answer.json()["errors"][0]["source"] == {"pointer": f"/{field}"}
    assert (await http.get("/sandbox/messages")).json()["data"] == []


async def test_account_wide_refusals(http: httpx.AsyncClient) -> None:
    for status, code in ((401, "10009"), (403, "10010")):
        await http.post("/sandbox/faults", json={"error_rate": 1, "status": status})
        assert _code(await _send(http)) == (status, code)
        assert _code(await http.get("/v2/balance", headers=AUTH)) == (status, code)
    await http.post("/sandbox/faults", json={"spend_limit_reached": True})
    assert _code(await _send(http)) == (400, "40333")
    assert (await http.get("/sandbox/messages")).json()["data"] == []
    assert (await http.get("/sandbox/stats")).json()["total"] == 0
    await http.delete("/sandbox/faults")
    assert (await _send(http)).status_code == 200


async def test_blocked_sending_number(http: httpx.AsyncClient) -> None:
    await http.post("/sandbox/faults", json={"blocked_numbers": [A]})
    blocked = await _send(http)
    assert _code(blocked) == (400, "40003")
    assert blocked.json()["errors"][0]["source"] == {"pointer": "/from"}
    assert (await _send(http, **{"from": B})).status_code == 200
    faults = (await http.get("/sandbox/faults")).json()
    assert faults["blocked_numbers"] == [A] and faults["error_rate"] == 0


async def test_accepted_then_hung_until_the_client_gives_up(
    http: httpx.AsyncClient, servers: tuple[LiveServer, Receiver]
) -> None:
    _, receiver = servers
    await http.post("/sandbox/faults", json={"accept_then_hang_rate": 1})
    with pytest.raises(httpx.ReadTimeout):
        await http.post("/v2/messages", headers=AUTH, json=SMS, timeout=0.3)
    log = (await http.get("/sandbox/messages")).json()["data"]
    assert len(log) == 1  # accepted: resending would text the person twice
    await eventually(lambda: len(receiver.for_message(log[0]["id"])) == 2)
    assert (await http.get("/sandbox/stats")).json()["total"] == 1


async def test_a_client_that_waits_out_the_hang_gets_a_504() -> None:
    receiver = Receiver()
    with (
        LiveServer(lambda: receiver.app) as hook_server,
        _serve(hook_server.url, timeout_hold_seconds=0.2) as sandbox,
    ):
        async with httpx.AsyncClient(base_url=sandbox.url, timeout=10) as http:
            await http.post("/sandbox/faults", json={"accept_then_hang_rate": 1})
            assert _code(await _send(http)) == (504, "10007")
            assert len((await http.get("/sandbox/messages")).json()["data"]) == 1


async def test_duplicated_reordered_and_delayed_receipts(
    http: httpx.AsyncClient, servers: tuple[LiveServer, Receiver]
) -> None:
    _, receiver = servers
    await http.post(
        "/sandbox/faults",
        json={"duplicate_receipt_rate": 1, "reorder_receipts": True, "receipt_delay_ms": 0},
    )
    message_id = (await _send(http)).json()["data"]["id"]
    await eventually(lambda: len(receiver.for_message(message_id)) == 4)
    events = receiver.for_message(message_id)
    assert [e["event_type"] for e in events] == [
        "message.finalized",
        "message.finalized",
        "message.sent",
        "message.sent",
    ]
    assert events[0]["id"] == events[1]["id"] != events[2]["id"] == events[3]["id"]
    looked_up = await http.get(f"/v2/messages/{message_id}", headers=AUTH)
    assert looked_up.json()["data"]["to"][0]["status"] == "delivered"
