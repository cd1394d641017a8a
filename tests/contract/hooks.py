"""Schemathesis hooks for `scripts/contract-test` (loaded through `SCHEMATHESIS_HOOKS`).

- **Auth**: every request carries the dedicated owner's access token. The token is
  fetched with the owner's refresh token (the family rotates on each use) and, when that
  is refused, by logging in again; schemathesis asks again when the cached token is older
  than 10 minutes (tokens live 15) or a request answered 401 (revoked). The MFA
  operations that need a real TOTP code run as a separate staff user, so their wrong
  codes lock that user's MFA and login, never the owner's.
- **Guards** (`before_call`, every phase): the owner never changes its own password,
  role or status and never deletes itself (the fuzzer would lock itself out; those
  paths have plain tests), `require_mfa` is never sent (MFA enforcement has plain tests),
  a logout ends a fresh session of the owner's (the only kind it may end), and the
  password fields of `/auth/mfa/enrol|disable` get the real password (a wrong
  one would count towards the owner's login lockout). Every other member body gets a
  phone that parses, every other `member_ids` the seeded member, every other
  registration a new email and every other login the owner's email and password:
  random data rarely reaches the flows behind them.
- **Record** (`after_call`): one line per answer, `METHOD PATH_TEMPLATE STATUS`, to
  `CONTRACT_CALLS`, which the runner reads to check that every operation got a 2xx.
"""

from __future__ import annotations

import itertools
import os
import threading
import uuid
from typing import Any

import httpx
import schemathesis
from schemathesis import Case, HookContext
from schemathesis.auths import AuthContext

API = os.environ.get("CONTRACT_API_URL", "http://127.0.0.1:8000")
# Operations that need a TOTP code the fuzzer cannot produce: run as the MFA user.
MFA_CODE_PATHS = frozenset(
    {
        "/api/v1/auth/mfa/confirm",
        "/api/v1/auth/mfa/verify",
        "/api/v1/auth/mfa/disable",
        "/api/v1/auth/mfa/recovery-codes",
    }
)
MEMBER_ID_PATHS = frozenset(
    {"/api/v1/groups/{group_id}/members", "/api/v1/messages/preview", "/api/v1/messages"}
)
SELF_PATHS = frozenset({"/api/v1/users/{user_id}", "/api/v1/users/{user_id}/mfa"})
_LOCK = threading.Lock()
_PHONES = itertools.count()


class _Account:
    """One user's credentials; `access_token()` refreshes, or logs in when refused."""

    def __init__(self, prefix: str) -> None:
        self.email = os.environ[f"{prefix}_EMAIL"]
        self.password = os.environ[f"{prefix}_PASSWORD"]
        self.refresh_token = os.environ[f"{prefix}_REFRESH_TOKEN"]
        self.fetches = 0

    def access_token(self) -> str:
        with httpx.Client(base_url=API, timeout=10) as client:
            answer = client.post("/api/v1/auth/refresh", json={"refresh_token": self.refresh_token})
            if answer.status_code != 200:  # the family was revoked: log in again
                answer = client.post(
                    "/api/v1/auth/login", json={"email": self.email, "password": self.password}
                )
            answer.raise_for_status()
            tokens = answer.json()
        if "access_token" not in tokens:
            raise RuntimeError(f"no token for {self.email}: {sorted(tokens)}")
        self.refresh_token = tokens["refresh_token"]
        self.fetches += 1
        _record(f"AUTH {self.email.split('@')[0]} {answer.status_code}")
        return str(tokens["access_token"])

    def new_session(self) -> str:
        """A refresh token of a new session (its own family) of this user."""
        with httpx.Client(base_url=API, timeout=10) as client:
            answer = client.post(
                "/api/v1/auth/login", json={"email": self.email, "password": self.password}
            )
        answer.raise_for_status()
        return str(answer.json()["refresh_token"])


OWNER = _Account("CONTRACT_OWNER")
MFA_USER = _Account("CONTRACT_MFA_USER")


def _new_staff_user() -> str:
    with httpx.Client(base_url=API, timeout=10) as client:
        answer = client.post(
            "/api/v1/users",
            json={
                "email": f"staff.{uuid.uuid4().hex[:12]}@example.org",
                "name": "Contract staff",
                "role": "staff",
                "password": uuid.uuid4().hex + "-Aa1",
            },
            headers={"Authorization": f"Bearer {OWNER.access_token()}"},
        )
    answer.raise_for_status()
    return str(answer.json()["id"])


def _record(line: str) -> None:
    path = os.environ.get("CONTRACT_CALLS")
    if path:
        with _LOCK, open(path, "a", encoding="utf-8") as log:
            log.write(line + "\n")


def _account_key(case: Case, context: AuthContext) -> str:
    return "mfa" if context.operation.path in MFA_CODE_PATHS else "owner"


@schemathesis.auth(refresh_interval=600, cache_by_key=_account_key)
class KoinoniaAuth:
    def get(self, case: Case, context: AuthContext) -> str:
        account = MFA_USER if context.operation.path in MFA_CODE_PATHS else OWNER
        return account.access_token()

    def set(self, case: Case, data: str, context: AuthContext) -> None:
        case.headers = {**(case.headers or {}), "Authorization": f"Bearer {data}"}


@schemathesis.hook
def before_call(context: HookContext, case: Case, kwargs: dict[str, Any]) -> None:
    path, body = case.operation.path, case.body
    owner_id = os.environ["CONTRACT_OWNER_ID"]
    params = case.path_parameters or {}
    if path == "/api/v1/users/{user_id}" and case.method.upper() == "DELETE":
        # Every other delete removes a staff user made for it: random ids never exist.
        deletable = _new_staff_user() if next(_PHONES) % 2 else str(uuid.uuid4())
        case.path_parameters = {**params, "user_id": deletable}
        params = case.path_parameters
    if path in SELF_PATHS and str(params.get("user_id")) == owner_id:
        if case.method.upper() == "DELETE":
            case.path_parameters = {**params, "user_id": str(uuid.uuid4())}
        elif isinstance(body, dict):
            for field in ("password", "role", "is_active"):
                body.pop(field, None)
    if path.startswith("/api/v1/members") and isinstance(body, dict):  # noqa: SIM102
        if isinstance(body.get("phone"), str) and next(_PHONES) % 2:
            # Every other member gets a phone that parses (random text rarely does), so
            # the flows that start from a member (send, conversations) are reached.
            body["phone"] = f"+1415555{100 + next(_PHONES) % 100:04d}"
    if path in MEMBER_ID_PATHS and isinstance(body, dict):  # noqa: SIM102
        if isinstance(body.get("member_ids"), list) and next(_PHONES) % 2:
            body["member_ids"] = [os.environ["CONTRACT_MEMBER_ID"]]  # one that exists
            if isinstance(body.get("group_ids"), list):
                body["group_ids"] = []
    if path == "/api/v1/auth/login" and isinstance(body, dict) and next(_PHONES) % 2:  # noqa: SIM102
        # A whole right pair or nothing: a real email with a wrong password would lock
        # the owner out (the login lockout is not lifted for allow-listed addresses).
        if isinstance(body.get("email"), str) and isinstance(body.get("password"), str):
            body["email"], body["password"] = OWNER.email, OWNER.password
    if path == "/api/v1/auth/register" and isinstance(body, dict):
        email = body.get("email")
        if isinstance(email, str) and "@" in email and next(_PHONES) % 2:
            # Generated emails repeat (409): make every other one new, so the
            # register → login link has an account to log in to.
            local, _, domain = email.rpartition("@")
            body["email"] = f"{local[:40]}.{uuid.uuid4().hex[:8]}@{domain}"
    if path == "/api/v1/auth/logout" and isinstance(body, dict):  # noqa: SIM102
        # Only a session of the caller can be ended: a fresh one of the owner's (never
        # the family the auth hook refreshes), else every logout is a 401.
        if isinstance(body.get("refresh_token"), str):
            body["refresh_token"] = OWNER.new_session()
    if path == "/api/v1/church" and isinstance(body, dict):
        body.pop("require_mfa", None)
    if path in ("/api/v1/auth/mfa/enrol", "/api/v1/auth/mfa/disable") and isinstance(body, dict):
        if isinstance(body.get("password"), str):
            account = MFA_USER if path in MFA_CODE_PATHS else OWNER
            body["password"] = account.password
        if path.endswith("/enrol"):
            body.pop("challenge", None)  # with a token: the password path


@schemathesis.hook
def after_call(context: HookContext, case: Case, response: Any) -> None:
    _record(f"{case.method.upper()} {case.operation.path} {response.status_code}")
