"""Staff MFA (issue 12): TOTP enrolment and confirmation, the login's second step, codes
used once, recovery codes, disabling, lockouts and the church-wide requirement — through
the HTTP API against the real PostgreSQL and Redis, at a controlled time (`mfa.clock`)."""

from __future__ import annotations

import asyncio
import dataclasses
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import parse_qs, quote, urlsplit

import httpx
import pyotp
import pytest
from sqlalchemy import select

from koinonia.accounts import mfa
from koinonia.accounts.tables import MfaRecoveryCode, User
from koinonia.app import create_app
from koinonia.audit.tables import AuditEntry
from koinonia.members.crypto import ContactCipher
from koinonia.settings import Settings
from tests.conftest import make_settings
from tests.support.api import PASSWORD, Account, add_user, register

Client = httpx.AsyncClient


class Clock:
    """The time `mfa` sees: starts just after a step boundary, moves only when told."""

    def __init__(self) -> None:
        self.now = float(int(time.time()) // mfa.STEP_SECONDS * mfa.STEP_SECONDS + 1)

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float = mfa.STEP_SECONDS) -> None:
        self.now += seconds


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    fake = Clock()
    monkeypatch.setattr(mfa, "clock", fake)
    return fake


def totp(secret: str, clock: Clock, steps: int = 0) -> str:
    return pyotp.TOTP(secret).at(clock.now, counter_offset=steps)


def with_tokens(account: Account, tokens: dict[str, Any]) -> Account:
    return dataclasses.replace(
        account, access_token=tokens["access_token"], refresh_token=tokens["refresh_token"]
    )


@dataclasses.dataclass
class Enrolled:
    account: Account
    secret: str
    recovery_codes: list[str]


async def enable_mfa(client: Client, account: Account, clock: Clock) -> Enrolled:
    enrol = await client.post(
        "/api/v1/auth/mfa/enrol", json={"password": PASSWORD}, headers=account.headers
    )
    assert enrol.status_code == 200, enrol.text
    secret = enrol.json()["secret"]
    confirm = await client.post(
        "/api/v1/auth/mfa/confirm", json={"code": totp(secret, clock)}, headers=account.headers
    )
    assert confirm.status_code == 200, confirm.text
    body = confirm.json()
    # The step used to confirm is spent: later codes come from the next step on.
    clock.advance()
    return Enrolled(with_tokens(account, body["tokens"]), secret, body["recovery_codes"])


async def login(client: Client, email: str, password: str = PASSWORD) -> httpx.Response:
    return await client.post("/api/v1/auth/login", json={"email": email, "password": password})


async def challenge_for(client: Client, email: str) -> str:
    response = await login(client, email)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["mfa_required"] is True
    return str(body["challenge"])


async def verify(client: Client, challenge: str, code: str) -> httpx.Response:
    return await client.post("/api/v1/auth/mfa/verify", json={"challenge": challenge, "code": code})


async def audit_actions(app: Any, user_id: str) -> list[str]:
    async with app.state.database.sessions() as session:
        rows = await session.scalars(
            select(AuditEntry.action).where(AuditEntry.target_id == user_id).order_by(AuditEntry.id)
        )
        return list(rows)


async def test_enrol_confirm_and_login_needs_the_second_step(
    client: Client, owner: Account, clock: Clock, app: Any, settings: Settings
) -> None:
    # Enrolling with an access token needs the password too.
    missing = await client.post("/api/v1/auth/mfa/enrol", headers=owner.headers)
    assert missing.status_code == 422
    assert missing.json()["errors"][0]["field"] == "password"
    wrong = await client.post(
        "/api/v1/auth/mfa/enrol", json={"password": "not my password"}, headers=owner.headers
    )
    assert wrong.status_code == 422
    assert wrong.json()["errors"][0]["field"] == "password"

    enrol = await client.post(
        "/api/v1/auth/mfa/enrol", json={"password": PASSWORD}, headers=owner.headers
    )
    assert enrol.status_code == 200, enrol.text
    secret = enrol.json()["secret"]
    uri = enrol.json()["provisioning_uri"]
    assert uri.startswith(f"otpauth://totp/Koinonia:{quote(owner.email)}?")
    query = parse_qs(urlsplit(uri).query)
    assert query["secret"] == [secret] and query["issuer"] == ["Koinonia"]

    # Stored encrypted (AES-GCM, the user id authenticated), never in plain text.
    async with app.state.database.sessions() as session:
        stored = await session.scalar(
            select(User.mfa_secret).where(User.id == uuid.UUID(owner.user_id))
        )
    assert stored is not None and secret.encode() not in bytes(stored)
    cipher = ContactCipher.from_settings(settings)
    assert cipher.decrypt(stored, uuid.UUID(owner.user_id)) == secret

    # Not active until confirmed: the password alone still logs in.
    status = await client.get("/api/v1/auth/mfa", headers=owner.headers)
    assert status.json() == {
        "enabled": False,
        "pending": True,
        "recovery_codes_left": 0,
        "church_requires_mfa": False,
    }
    assert "access_token" in (await login(client, owner.email)).json()

    bad = await client.post(
        "/api/v1/auth/mfa/confirm", json={"code": totp(secret, clock, 3)}, headers=owner.headers
    )
    assert bad.status_code == 422
    assert bad.json()["errors"][0]["field"] == "code"
    confirm = await client.post(
        "/api/v1/auth/mfa/confirm", json={"code": totp(secret, clock)}, headers=owner.headers
    )
    assert confirm.status_code == 200, confirm.text
    codes = confirm.json()["recovery_codes"]
    assert len(codes) == 10 and len(set(codes)) == 10
    # Recovery codes are kept only as keyed hashes.
    async with app.state.database.sessions() as session:
        hashes = (
            await session.scalars(
                select(MfaRecoveryCode.code_hash).where(
                    MfaRecoveryCode.user_id == uuid.UUID(owner.user_id)
                )
            )
        ).all()
    assert len(hashes) == 10
    assert all(code.encode() not in bytes(h) for code in codes for h in hashes)

    # Turning MFA on ended the other sessions; the answer carries a fresh pair.
    assert (await client.get("/api/v1/auth/me", headers=owner.headers)).status_code == 401
    stale = await client.post("/api/v1/auth/refresh", json={"refresh_token": owner.refresh_token})
    assert stale.status_code == 401
    fresh = with_tokens(owner, confirm.json()["tokens"])
    me = await client.get("/api/v1/auth/me", headers=fresh.headers)
    assert me.status_code == 200 and me.json()["user"]["mfa_enabled"] is True
    again = await client.post(
        "/api/v1/auth/mfa/enrol", json={"password": PASSWORD}, headers=fresh.headers
    )
    assert again.status_code == 409

    # The password alone no longer gives tokens.
    first = await login(client, owner.email)
    assert first.status_code == 200
    assert set(first.json()) == {"mfa_required", "challenge", "expires_in"}
    assert first.json()["expires_in"] == 300
    challenge = first.json()["challenge"]
    # The confirming code's step is spent already.
    assert (await verify(client, challenge, totp(secret, clock))).status_code == 401
    clock.advance()
    code = totp(secret, clock)
    verified = await verify(client, challenge, code)
    assert verified.status_code == 200, verified.text
    tokens = verified.json()
    assert set(tokens) == {"access_token", "refresh_token", "token_type", "expires_in"}
    session_headers = {"Authorization": f"Bearer {tokens['access_token']}"}
    assert (await client.get("/api/v1/auth/me", headers=session_headers)).status_code == 200

    # Each code works once, even with a new challenge.
    replay = await verify(client, await challenge_for(client, owner.email), code)
    assert replay.status_code == 401
    assert replay.json()["code"] == "unauthenticated"

    assert await audit_actions(app, owner.user_id) == [
        "user.mfa_enrolment_started",
        "user.mfa_enabled",
    ]
    async with app.state.database.sessions() as session:
        login_details = (
            await session.scalars(
                select(AuditEntry.details).where(
                    AuditEntry.actor_id == uuid.UUID(owner.user_id),
                    AuditEntry.action == "user.login",
                )
            )
        ).all()
    assert {"mfa": "totp"} in login_details


async def test_codes_are_accepted_one_step_either_side_and_only_forward(
    client: Client, owner: Account, clock: Clock
) -> None:
    enrolled = await enable_mfa(client, owner, clock)
    secret, email = enrolled.secret, owner.email
    clock.advance(10 * mfa.STEP_SECONDS)
    # A step behind (a slow phone clock) passes.
    late = await verify(client, await challenge_for(client, email), totp(secret, clock, -1))
    assert late.status_code == 200
    # Two steps ahead is outside the window; one ahead passes.
    ahead = await verify(client, await challenge_for(client, email), totp(secret, clock, 2))
    assert ahead.status_code == 401
    early = await verify(client, await challenge_for(client, email), totp(secret, clock, 1))
    assert early.status_code == 200
    # A step at or before the last used one is refused, although inside the window.
    older = await verify(client, await challenge_for(client, email), totp(secret, clock))
    assert older.status_code == 401


async def test_the_same_code_sent_twice_at_once_passes_once(
    client: Client, owner: Account, clock: Clock
) -> None:
    enrolled = await enable_mfa(client, owner, clock)
    challenges = [await challenge_for(client, owner.email) for _ in range(4)]
    code = totp(enrolled.secret, clock)
    answers = await asyncio.gather(*(verify(client, c, code) for c in challenges))
    assert sorted(a.status_code for a in answers) == [200, 401, 401, 401]


async def test_recovery_codes_work_once_and_can_be_replaced(
    client: Client, owner: Account, clock: Clock, app: Any
) -> None:
    enrolled = await enable_mfa(client, owner, clock)
    first, second = enrolled.recovery_codes[:2]
    # Typed sloppily: case, spaces and the hyphen do not matter.
    sloppy = f" {first.replace('-', '').upper()} "
    used = await verify(client, await challenge_for(client, owner.email), sloppy)
    assert used.status_code == 200, used.text
    account = with_tokens(owner, used.json())
    again = await verify(client, await challenge_for(client, owner.email), first)
    assert again.status_code == 401
    status = await client.get("/api/v1/auth/mfa", headers=account.headers)
    assert status.json()["recovery_codes_left"] == 9

    # Replacing them needs a code; the old ones stop working and sessions end.
    refused = await client.post(
        "/api/v1/auth/mfa/recovery-codes", json={"code": "000000"}, headers=account.headers
    )
    assert refused.status_code == 422
    replaced = await client.post(
        "/api/v1/auth/mfa/recovery-codes",
        json={"code": totp(enrolled.secret, clock)},
        headers=account.headers,
    )
    assert replaced.status_code == 200, replaced.text
    new_codes = replaced.json()["recovery_codes"]
    assert len(new_codes) == 10 and not set(new_codes) & set(enrolled.recovery_codes)
    assert (await client.get("/api/v1/auth/me", headers=account.headers)).status_code == 401
    account = with_tokens(owner, replaced.json()["tokens"])
    assert (await client.get("/api/v1/auth/me", headers=account.headers)).status_code == 200
    old = await verify(client, await challenge_for(client, owner.email), second)
    assert old.status_code == 401
    new = await verify(client, await challenge_for(client, owner.email), new_codes[0])
    assert new.status_code == 200
    actions = await audit_actions(app, owner.user_id)
    assert actions.count("user.mfa_recovery_code_used") == 2
    assert "user.mfa_recovery_codes_regenerated" in actions


async def test_challenges_expire_and_serve_one_purpose(
    client: Client, owner: Account, clock: Clock
) -> None:
    enrolled = await enable_mfa(client, owner, clock)
    challenge = await challenge_for(client, owner.email)
    # Not a bearer token.
    as_bearer = await client.get(
        "/api/v1/auth/me", headers={"Authorization": f"Bearer {challenge}"}
    )
    assert as_bearer.status_code == 401
    # Not an enrolment challenge either.
    as_enrol = await client.post("/api/v1/auth/mfa/enrol", json={"challenge": challenge})
    assert as_enrol.status_code == 401
    # An access token is not a challenge; garbage neither.
    assert (
        await verify(client, enrolled.account.access_token, totp(enrolled.secret, clock))
    ).status_code == 401
    assert (await verify(client, "x" * 40, totp(enrolled.secret, clock))).status_code == 401

    clock.advance(mfa.CHALLENGE_TTL_SECONDS + 1)
    expired = await verify(client, challenge, totp(enrolled.secret, clock))
    assert expired.status_code == 401
    assert "expired" in expired.json()["detail"]

    # A password change (any revocation) voids the challenges issued before it.
    challenge = await challenge_for(client, owner.email)
    staff = await add_user(client, enrolled.account, role="staff")
    staff_enrolled = await enable_mfa(client, staff, clock)
    staff_challenge = await challenge_for(client, staff.email)
    changed = await client.patch(
        f"/api/v1/users/{staff.user_id}",
        json={"password": "another long password"},
        headers=enrolled.account.headers,
    )
    assert changed.status_code == 200
    stale = await verify(client, staff_challenge, totp(staff_enrolled.secret, clock))
    assert stale.status_code == 401
    assert (await verify(client, challenge, totp(enrolled.secret, clock))).status_code == 200


async def test_disable_with_a_code_or_the_password(
    client: Client, owner: Account, clock: Clock, app: Any
) -> None:
    enrolled = await enable_mfa(client, owner, clock)
    account = enrolled.account
    neither = await client.post("/api/v1/auth/mfa/disable", json={}, headers=account.headers)
    assert neither.status_code == 422
    wrong = await client.post(
        "/api/v1/auth/mfa/disable", json={"password": "wrong password"}, headers=account.headers
    )
    assert wrong.status_code == 422
    off = await client.post(
        "/api/v1/auth/mfa/disable", json={"password": PASSWORD}, headers=account.headers
    )
    assert off.status_code == 200, off.text
    assert off.json()["mfa_enabled"] is False
    # Every session ended; the answer carries a fresh pair.
    assert (await client.get("/api/v1/auth/me", headers=account.headers)).status_code == 401
    account = with_tokens(owner, off.json()["tokens"])
    me = await client.get("/api/v1/auth/me", headers=account.headers)
    assert me.json()["user"]["mfa_enabled"] is False
    assert "access_token" in (await login(client, owner.email)).json()
    not_on = await client.post(
        "/api/v1/auth/mfa/disable", json={"password": PASSWORD}, headers=account.headers
    )
    assert not_on.status_code == 409

    # Again, and off with a code this time.
    enrolled = await enable_mfa(client, account, clock)
    off = await client.post(
        "/api/v1/auth/mfa/disable",
        json={"code": totp(enrolled.secret, clock)},
        headers=enrolled.account.headers,
    )
    assert off.status_code == 200, off.text
    actions = await audit_actions(app, owner.user_id)
    assert actions.count("user.mfa_enabled") == 2
    assert actions.count("user.mfa_disabled") == 2


async def test_wrong_codes_lock_out_like_logins(
    client: Client, owner: Account, clock: Clock, settings: Settings
) -> None:
    enrolled = await enable_mfa(client, owner, clock)
    challenge = await challenge_for(client, owner.email)
    good = totp(enrolled.secret, clock)
    wrong = f"{(int(good) + 1) % 1_000_000:06d}"
    statuses = [(await verify(client, challenge, wrong)).status_code for _ in range(5)]
    assert statuses == [401] * settings.login_lockout_failures
    # Locked: even the right code is refused, and so is the password from this address.
    locked = await verify(client, challenge, good)
    assert locked.status_code == 429
    assert int(locked.headers["Retry-After"]) > 0
    assert (await login(client, owner.email)).status_code == 429


@asynccontextmanager
async def clients_from(settings: Settings, count: int) -> AsyncIterator[tuple[Any, list[Client]]]:
    """One app, `count` clients each from its own address."""
    app = create_app(make_settings(database_url=settings.database_url))
    async with app.router.lifespan_context(app):
        clients = [
            httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app, client=(f"198.51.100.{i + 1}", 40000)),
                base_url="http://testserver",
            )
            for i in range(count)
        ]
        try:
            yield app, clients
        finally:
            for c in clients:
                await c.aclose()


async def test_guessing_from_many_addresses_locks_the_users_mfa(
    client: Client, clock: Clock, settings: Settings
) -> None:
    account = await register(client)
    enrolled = await enable_mfa(client, account, clock)
    good = totp(enrolled.secret, clock)
    wrong = f"{(int(good) + 1) % 1_000_000:06d}"
    async with clients_from(settings, 4) as (_, clients):
        # 4 + 4 + 2 wrong codes: under each address's lockout, at the user's limit.
        for guesser, tries in zip(clients[:3], (4, 4, 2), strict=True):
            challenge = await challenge_for(guesser, account.email)
            for _ in range(tries):
                assert (await verify(guesser, challenge, wrong)).status_code == 401
        fresh = await challenge_for(clients[3], account.email)
        assert (await verify(clients[3], fresh, good)).status_code == 429


async def test_church_wide_requirement(
    client: Client, owner: Account, clock: Clock, app: Any
) -> None:
    staff = await add_user(client, owner, role="staff")
    admin = await add_user(client, owner, role="admin")
    key = await client.post(
        "/api/v1/api-keys", json={"name": "website", "role": "admin"}, headers=owner.headers
    )
    assert key.status_code == 201
    key_headers = {"Authorization": f"Bearer {key.json()['key']}"}

    by_admin = await client.patch(
        "/api/v1/church", json={"require_mfa": True}, headers=admin.headers
    )
    assert by_admin.status_code == 403
    by_key = await client.patch("/api/v1/church", json={"require_mfa": True}, headers=key_headers)
    assert by_key.status_code == 403
    # The owner must have MFA on before requiring it.
    too_soon = await client.patch(
        "/api/v1/church", json={"require_mfa": True}, headers=owner.headers
    )
    assert too_soon.status_code == 409

    owner_mfa = await enable_mfa(client, owner, clock)
    required = await client.patch(
        "/api/v1/church", json={"require_mfa": True}, headers=owner_mfa.account.headers
    )
    assert required.status_code == 200, required.text
    assert required.json()["require_mfa"] is True
    # Staff without MFA lose their sessions now; API keys are not affected.
    assert (await client.get("/api/v1/auth/me", headers=staff.headers)).status_code == 401
    refresh = await client.post("/api/v1/auth/refresh", json={"refresh_token": staff.refresh_token})
    assert refresh.status_code == 401
    assert (await client.get("/api/v1/members", headers=key_headers)).status_code == 200
    assert (
        await client.get("/api/v1/auth/me", headers=owner_mfa.account.headers)
    ).status_code == 200

    # The staff member's next login only lets them enrol.
    restricted = await login(client, staff.email)
    assert restricted.status_code == 200
    body = restricted.json()
    assert set(body) == {"mfa_enrolment_required", "challenge", "expires_in"}
    challenge = body["challenge"]
    as_bearer = await client.get(
        "/api/v1/auth/me", headers={"Authorization": f"Bearer {challenge}"}
    )
    assert as_bearer.status_code == 401
    assert (await verify(client, challenge, "123456")).status_code == 401
    enrol = await client.post("/api/v1/auth/mfa/enrol", json={"challenge": challenge})
    assert enrol.status_code == 200, enrol.text
    secret = enrol.json()["secret"]
    confirm = await client.post(
        "/api/v1/auth/mfa/confirm", json={"challenge": challenge, "code": totp(secret, clock)}
    )
    assert confirm.status_code == 200, confirm.text
    assert len(confirm.json()["recovery_codes"]) == 10
    staff = with_tokens(staff, confirm.json()["tokens"])
    me = await client.get("/api/v1/auth/me", headers=staff.headers)
    assert me.status_code == 200 and me.json()["user"]["mfa_enabled"] is True
    # The challenge is spent (MFA is on, the sessions version moved on).
    reused = await client.post("/api/v1/auth/mfa/enrol", json={"challenge": challenge})
    assert reused.status_code == 401
    clock.advance()
    assert (await login(client, staff.email)).json()["mfa_required"] is True

    # Turning it off while required: no fresh pair, the next login enrols again.
    off = await client.post(
        "/api/v1/auth/mfa/disable", json={"code": totp(secret, clock)}, headers=staff.headers
    )
    assert off.status_code == 200 and off.json()["tokens"] is None
    assert (await login(client, staff.email)).json()["mfa_enrolment_required"] is True

    relaxed = await client.patch(
        "/api/v1/church", json={"require_mfa": False}, headers=owner_mfa.account.headers
    )
    assert relaxed.status_code == 200 and relaxed.json()["require_mfa"] is False
    assert "access_token" in (await login(client, staff.email)).json()
    async with app.state.database.sessions() as session:
        changes = (
            await session.scalars(
                select(AuditEntry.details).where(
                    AuditEntry.church_id == uuid.UUID(owner.church_id),
                    AuditEntry.action == "church.mfa_requirement_changed",
                )
            )
        ).all()
    assert [c["require_mfa"] for c in changes] == [True, False]
    assert changes[0]["sessions_ended_for_users"] == 2  # the staff member and the admin


async def test_managers_reset_a_users_mfa(
    client: Client, owner: Account, other_church: Account, clock: Clock, app: Any
) -> None:
    admin = await add_user(client, owner, role="admin")
    staff = await add_user(client, owner, role="staff")
    owner_mfa = await enable_mfa(client, owner, clock)
    staff_mfa = await enable_mfa(client, staff, clock)
    key = await client.post(
        "/api/v1/api-keys", json={"name": "sync", "role": "admin"}, headers=admin.headers
    )
    key_headers = {"Authorization": f"Bearer {key.json()['key']}"}

    path = f"/api/v1/users/{staff.user_id}/mfa"
    assert (await client.delete(path, headers=key_headers)).status_code == 403
    assert (await client.delete(path, headers=other_church.headers)).status_code == 404
    owner_path = f"/api/v1/users/{owner.user_id}/mfa"
    assert (await client.delete(owner_path, headers=admin.headers)).status_code == 403
    own = await client.delete(owner_path, headers=owner_mfa.account.headers)
    assert own.status_code == 403

    reset = await client.delete(path, headers=admin.headers)
    assert reset.status_code == 204
    assert (
        await client.get("/api/v1/auth/me", headers=staff_mfa.account.headers)
    ).status_code == 401
    assert "access_token" in (await login(client, staff.email)).json()
    assert "user.mfa_reset" in await audit_actions(app, staff.user_id)


async def test_api_keys_do_not_use_mfa(client: Client, owner: Account) -> None:
    key = await client.post(
        "/api/v1/api-keys", json={"name": "k", "role": "admin"}, headers=owner.headers
    )
    headers = {"Authorization": f"Bearer {key.json()['key']}"}
    assert (await client.get("/api/v1/auth/mfa", headers=headers)).status_code == 403
    enrol = await client.post(
        "/api/v1/auth/mfa/enrol", json={"password": PASSWORD}, headers=headers
    )
    assert enrol.status_code == 403


def test_recovery_codes_shape() -> None:
    codes = mfa.generate_recovery_codes()
    assert len(codes) == mfa.RECOVERY_CODE_COUNT
    assert all(len(c) == 11 and c[5] == "-" for c in codes)
    normalise: Callable[[str], str] = mfa.normalise_recovery_code
    assert normalise(" ABCDE-FGH23 ") == "abcdefgh23"
