"""`koinonia members renormalize-phones` on rows stored before phones were made ASCII."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import uuid
from datetime import UTC, datetime

import httpx
from fastapi import FastAPI

from koinonia.members.crypto import ContactCipher
from koinonia.members.tables import Member
from koinonia.settings import Settings
from tests.support.api import Account, add_member


async def _legacy(
    app: FastAPI, settings: Settings, church_id: str, stored: str, *, opted_out: bool = False
) -> str:
    """A member row as the old code stored it: the phone as typed, hashed as typed."""
    cipher = ContactCipher.from_settings(settings)
    church = uuid.UUID(church_id)
    async with app.state.database.unit_of_work() as session:
        member = Member(
            church_id=church,
            first_name="Legacy",
            last_name="Row",
            phone_ct=cipher.encrypt(stored, church),
            phone_hash=cipher.phone_hash(stored, church),
            opted_out=opted_out,
            opted_out_at=datetime(2025, 1, 2, tzinfo=UTC) if opted_out else None,
            opted_out_source="keyword" if opted_out else None,
        )
        session.add(member)
        await session.flush()
        return str(member.id)


def _run_cli(settings: Settings) -> str:
    env = {
        "DATABASE_URL": settings.database_url,
        "REDIS_URL": settings.redis_url,
        "KOINONIA_ENV": "test",
        "PATH": "/usr/bin:/bin",
    }
    result = subprocess.run(
        [sys.executable, "-m", "koinonia", "members", "renormalize-phones", "--batch", "50"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


async def test_renormalize_rewrites_merges_opt_outs_and_lists_twins(
    client: httpx.AsyncClient, app: FastAPI, settings: Settings, owner: Account
) -> None:
    # A keeper that texted STOP, and its twin stored with Arabic-Indic digits.
    keeper = await add_member(client, owner, phone="+1 212 555 0123")
    stop = await client.patch(
        f"/api/v1/members/{keeper['id']}", json={"opted_out": True}, headers=owner.headers
    )
    assert stop.status_code == 200, stop.text
    twin = await _legacy(app, settings, owner.church_id, "+12125٥٥٠١٢٣")
    # A keeper that did not opt out, and a twin (fullwidth digits) that did.
    keeper2 = await add_member(client, owner, phone="+1 212 555 0124")
    twin2 = await _legacy(app, settings, owner.church_id, "+1２１２５５５０１２４", opted_out=True)
    # No twin: simply re-normalised.
    alone = await _legacy(app, settings, owner.church_id, "+1४१५५५५०१९९")

    output = await asyncio.to_thread(_run_cli, settings)

    def get(member_id: str) -> dict[str, object]:
        return dict(response.json()) if (response := members[member_id]).status_code == 200 else {}

    members = {
        m: await client.get(f"/api/v1/members/{m}", headers=owner.headers)
        for m in (keeper["id"], twin, keeper2["id"], twin2, alone)
    }
    # Every phone is ASCII E.164 now.
    assert get(twin)["phone"] == "+12125550123"
    assert get(twin2)["phone"] == "+12125550124"
    assert get(alone)["phone"] == "+14155550199"
    # Opt-outs are copied both ways: the twin that had not opted out is not texted.
    assert get(twin)["opted_out"] is True
    assert get(keeper2["id"])["opted_out"] is True
    assert get(keeper2["id"])["opted_out_source"] == "keyword"
    # The non-canonical twins are listed for review, with the member they duplicate.
    assert f"{owner.church_id} {twin} duplicate_phone {keeper['id']}" in output
    assert f"{owner.church_id} {twin2} duplicate_phone {keeper2['id']}" in output
    assert alone not in output
    # The re-normalised row answers to its phone through the blind index.
    found = await client.get("/api/v1/members", params={"q": "+14155550199"}, headers=owner.headers)
    assert [m["id"] for m in found.json()["data"]] == [alone]
    # Adding the phone again finds the keeper (409), not a third identity.
    again = await client.post(
        "/api/v1/members", json={"phone": "(212) 555-0123"}, headers=owner.headers
    )
    assert again.status_code == 409, again.text

    # A second run changes nothing and still lists the twins.
    second = await asyncio.to_thread(_run_cli, settings)
    assert "re-normalised 0, copied 0 opt-out(s)" in second
    assert f"{owner.church_id} {twin} duplicate_phone {keeper['id']}" in second
