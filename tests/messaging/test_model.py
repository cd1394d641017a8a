"""A seeded model-based test of sending: random sequences of what churches, phones, the
provider and the infrastructure do, against real processes, then the promises checked.

Everything is real and private to this test: a PostgreSQL cluster on a free port (so it
can be restarted and stopped without touching the shared one), the API over loopback
HTTP, a `koinonia worker` subprocess (killed with SIGKILL and restarted, as its
supervisor would), and a sandbox playing Telnyx with its own fault switches and limits.

Steps: broadcasts now (with and without an `Idempotency-Key`; a create that failed
without a key is never retried), scheduled a few seconds ahead, cancels, inbound STOP and
HELP, provider faults (5xx, accepted-then-hung, 429, account-level 401, a full queue,
receipts duplicated and out of order), the worker killed, connections dropped, PostgreSQL
restarted or stopped for a while, and time passing. Each broadcast carries a unique token
in its body.

After a sequence, once faults clear, these must hold:
- at most one accepted text per (token, phone);
- every accepted, non-cancelled broadcast completes;
- no text accepted for a phone more than 5 s after its STOP was acknowledged;
- per church, debits − credits = billed segments of texts that went out + reservations;
- the account and per-number rates were never exceeded (rate + burst per second).

`KOINONIA_SCALE=ci` runs a few short sequences; without it more and longer ones.
Hypothesis prints the failing steps; a failure found here is kept as a plain test.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, ClassVar

import httpx
import psycopg
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
    run_state_machine_as_test,
)
from redis import Redis

from koinonia.app import create_app
from koinonia.sandbox.server import create_sandbox_app
from koinonia.sandbox.state import SandboxConfig
from koinonia.settings import load_settings
from tests.conftest import TELNYX_TEST_SEED, telnyx_test_public_key
from tests.support.api import random_phone
from tests.support.pgcluster import PgCluster
from tests.support.servers import LiveServer, free_port

pytestmark = [pytest.mark.slow, pytest.mark.nopgbouncer]

FULL = os.environ.get("KOINONIA_SCALE") != "ci"
KOINONIA = Path(sys.executable).with_name("koinonia")
REDIS_URL = "redis://127.0.0.1:6379/13"
ACCOUNT_RATE = 20
NUMBER_RATE = 10
MEMBERS = 5
STOP_BOUND_SECONDS = 5.0
# A chunk already being sent when the window closes may land just after (one Telnyx
# timeout plus a little).
WINDOW_GRACE_SECONDS = 2.5
ALWAYS_OPEN = {"send_window_start": "00:00", "send_window_end": "00:00"}
FAULTS: dict[str, dict[str, Any]] = {
    "5xx": {"error_rate": 0.4, "status": 500},
    "hang": {"accept_then_hang_rate": 0.4},
    "429": {"error_rate": 0.6, "status": 429},
    "401": {"error_rate": 1.0, "status": 401},
    "receipts": {"receipt_delay_ms": 300, "duplicate_receipt_rate": 0.5, "reorder_receipts": True},
}


def wait_for(check: Callable[[], Any], *, within: float, what: str, every: float = 0.2) -> Any:
    deadline = time.monotonic() + within
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(every)
    raise AssertionError(f"{what}: not within {within} s (last: {last!r})")


@dataclass
class Church:
    id: str
    headers: dict[str, str]
    number: str
    group_id: str
    phones: list[str]


class Worker:
    """`koinonia worker` as its supervisor runs it: restarted whenever it is not running."""

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.env = env
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def ensure_running(self) -> None:
        if self.process is not None and self.process.poll() is None:
            return
        self.starts += 1
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [str(KOINONIA), "worker", "--concurrency", "4"],
            env=os.environ | self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.kill()


@dataclass
class Environment:
    cluster: PgCluster
    api: httpx.Client
    sandbox: httpx.Client
    worker: Worker
    database_url: str
    churches: list[Church] = field(default_factory=list)

    def sql(self, query: str, *params: Any) -> list[tuple[Any, ...]]:
        conninfo = self.database_url.replace("postgresql+psycopg://", "postgresql://")
        with psycopg.connect(conninfo, autocommit=True, connect_timeout=5) as connection:
            cursor = connection.execute(query, params or None)
            return list(cursor.fetchall()) if cursor.description else []

    def patch_church(self, church: Church, body: dict[str, Any]) -> None:
        """Idempotent, so retried through a database restart until it answers 200."""

        def patched() -> bool:
            try:
                answer = self.api.patch("/api/v1/church", json=body, headers=church.headers)
            except httpx.HTTPError:
                return False
            return answer.status_code == 200

        wait_for(patched, within=30, what="PATCH /church", every=0.5)

    def settle(self) -> None:
        """Faults clear: the provider behaves, the database and the worker are up, an
        operator lifts any sending pause."""
        self.sandbox.delete("/sandbox/faults")
        self.sandbox.delete("/sandbox/limits")
        if not self.cluster.running:
            self.cluster.start()
        self.worker.ensure_running()
        wait_for(lambda: self._sql_ok(), within=30, what="database answers")
        self.sql("DELETE FROM sender_pauses")
        self.sql(
            "UPDATE procrastinate_jobs SET scheduled_at = now() WHERE status = 'todo' "
            "AND task_name = 'messaging:wake_batch'"
        )

    def _sql_ok(self) -> bool:
        try:
            self.sql("SELECT 1")
        except psycopg.Error:
            return False
        return True


@pytest.fixture(scope="module")
def environment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Environment]:
    Redis.from_url(REDIS_URL).flushdb()
    with PgCluster() as cluster:
        database_url = cluster.create_app_database()
        api_port, sandbox_port = free_port(), free_port()
        api_url, sandbox_url = f"http://127.0.0.1:{api_port}", f"http://127.0.0.1:{sandbox_port}"
        values: dict[str, Any] = {
            "KOINONIA_ENV": "test",
            "database_url": database_url,
            "redis_url": REDIS_URL,
            "public_base_url": api_url,
            "telnyx_base_url": sandbox_url,
            "stripe_base_url": sandbox_url,
            "telnyx_public_key": telnyx_test_public_key(),
            "telnyx_timeout": 1.5,
            "send_lease_seconds": 2.0,
            "send_reconcile_after_seconds": 3.0,
            "send_time_slice_seconds": 1.0,
            "telnyx_account_sends_per_second": ACCOUNT_RATE,
            "sends_per_second_per_number": NUMBER_RATE,
            "rate_limit_allowlist": ["127.0.0.1/32"],
            "worker_db_grace_seconds": 20.0,
            "access_token_ttl_seconds": 86400,  # a full-size run outlasts the default
        }
        api_settings = load_settings(**values)
        worker_env = {
            key.upper(): (json.dumps(value) if isinstance(value, list) else str(value))
            for key, value in values.items()
        } | {"LOG_LEVEL": "INFO", "RATE_LIMIT_ALLOWLIST": "127.0.0.1/32"}
        config = SandboxConfig(
            telnyx_webhook_url=f"{api_url}/api/v1/webhooks/telnyx",
            stripe_webhook_url=f"{api_url}/api/v1/webhooks/stripe",
            telnyx_private_key=TELNYX_TEST_SEED,
            public_base_url=sandbox_url,
            seed=7,
        )
        log_path = tmp_path_factory.mktemp("model") / "worker.log"
        worker = Worker(worker_env, log_path)
        with (
            LiveServer(lambda: create_app(api_settings), port=api_port),
            LiveServer(lambda: create_sandbox_app(config), port=sandbox_port),
            httpx.Client(base_url=api_url, timeout=15) as api,
            httpx.Client(base_url=sandbox_url, timeout=15) as sandbox,
        ):
            env = Environment(cluster, api, sandbox, worker, database_url)
            worker.ensure_running()
            try:
                env.churches = [_church(env, i) for i in range(2)]
                yield env
            finally:
                worker.stop()
                if env.cluster.running is False:
                    with contextlib.suppress(Exception):
                        env.cluster.start()
                sys.stderr.write(f"worker log: {log_path} (started {worker.starts} times)\n")


def _church(env: Environment, index: int) -> Church:
    email = f"model-{uuid.uuid4().hex[:10]}@example.org"
    registered = env.api.post(
        "/api/v1/auth/register",
        json={
            "church_name": f"Model church {index}",
            "name": "Owner",
            "email": email,
            "password": "a-long-enough-password-1",
        },
    )
    assert registered.status_code == 201, registered.text
    headers = {"Authorization": f"Bearer {registered.json()['access_token']}"}

    def numbered() -> Any:
        me = env.api.get("/api/v1/auth/me", headers=headers).json()
        return me["church"]["phone_number"] if me["church"]["number_status"] == "assigned" else None

    number = wait_for(numbered, within=30, what="number provisioned")
    church_id = env.api.get("/api/v1/auth/me", headers=headers).json()["church"]["id"]
    patched = env.api.patch(
        "/api/v1/church",
        json={"send_window_start": "00:00", "send_window_end": "00:00"},
        headers=headers,
    )
    assert patched.status_code == 200, patched.text
    env.sql(
        "INSERT INTO usage_ledger (church_id, period_start, kind, segments, reference) "
        "SELECT church_id, period_start, 'grant', 100000, 'model-grant' FROM subscriptions "
        "WHERE church_id = %s",
        uuid.UUID(church_id),
    )
    group = env.api.post("/api/v1/groups", json={"name": "everyone"}, headers=headers)
    assert group.status_code == 201, group.text
    phones, ids = [], []
    for i in range(MEMBERS):
        phone = random_phone()
        member = env.api.post(
            "/api/v1/members",
            json={"first_name": f"M{i}", "last_name": "Model", "phone": phone},
            headers=headers,
        )
        assert member.status_code == 201, member.text
        phones.append(member.json()["phone"])
        ids.append(member.json()["id"])
    added = env.api.post(
        f"/api/v1/groups/{group.json()['id']}/members", json={"member_ids": ids}, headers=headers
    )
    assert added.status_code in (200, 204), added.text
    return Church(church_id, headers, number, group.json()["id"], phones)


@dataclass
class Broadcast:
    token: str
    church: int
    message_id: str | None  # None: the create's outcome is unknown (no key, an error)
    urgent: bool = False
    cancelled: bool = False


class SendingModel(RuleBasedStateMachine):
    env: Environment
    tally: ClassVar[Counter[str]] = Counter()  # what the sequences did, over all examples

    def __init__(self) -> None:
        super().__init__()
        self.env.settle()
        self.env.sandbox.delete("/sandbox/stats")
        self.broadcasts: list[Broadcast] = []
        self.stopped: dict[str, float] = {}  # phone → when its STOP was acknowledged
        # Per church: when its sending window closed (None: open), and the closed spells.
        self.closed_since: list[float | None] = [None, None]
        self.closures: list[list[tuple[float, float]]] = [[], []]

    # --- what churches do -------------------------------------------------------------

    def _create(self, church: int, keyed: bool, urgent: bool = False, **extra: Any) -> None:
        token = uuid.uuid4().hex[:12]
        target = self.env.churches[church]
        body = {"body": f"{token} Hi {{{{first_name}}}}", "group_ids": [target.group_id]}
        if urgent:
            body["urgent"] = True
        headers = dict(target.headers)
        if keyed:
            headers["Idempotency-Key"] = str(uuid.uuid4())
        for _ in range(40 if keyed else 1):
            try:
                answer = self.env.api.post("/api/v1/messages", json=body | extra, headers=headers)
            except httpx.HTTPError:
                answer = None
            if answer is not None and answer.status_code == 202:
                self.broadcasts.append(Broadcast(token, church, answer.json()["id"], urgent))
                return
            if answer is not None and answer.status_code < 500:
                raise AssertionError(f"create refused: {answer.status_code} {answer.text}")
            time.sleep(0.5)  # the model's client backs off before retrying under its key
        if keyed:
            raise AssertionError("a keyed create never succeeded within 20 s")
        self.broadcasts.append(Broadcast(token, church, None, urgent))

    @initialize(keyed=st.booleans())
    def first_broadcasts(self, keyed: bool) -> None:
        """Every sequence starts with a broadcast from each church, so the faults that
        follow always have texts in flight to disturb."""
        self.tally["broadcast_now"] += 2
        for church in range(len(self.env.churches)):
            self._create(church, keyed)

    @rule(church=st.integers(0, 1), keyed=st.booleans(), urgent=st.booleans())
    def broadcast_now(self, church: int, keyed: bool, urgent: bool) -> None:
        self.tally["broadcast_now"] += 1
        self._create(church, keyed, urgent)

    @rule(church=st.integers(0, 1), seconds=st.floats(1.0, 4.0))
    def broadcast_scheduled(self, church: int, seconds: float) -> None:
        self.tally["broadcast_scheduled"] += 1
        when = datetime.now(UTC) + timedelta(seconds=seconds)
        self._create(church, True, scheduled_at=when.isoformat())

    # The choice is drawn the same way whatever happened before (which creates succeeded
    # depends on the faults): a draw shaped by outside state makes Hypothesis's replay of
    # a sequence inconsistent.
    @rule(pick=st.integers(0, 10_000))
    def cancel(self, pick: int) -> None:
        self.tally["cancel"] += 1
        known = [b for b in self.broadcasts if b.message_id and not b.cancelled]
        if not known:
            return
        chosen = known[pick % len(known)]
        church = self.env.churches[chosen.church]
        try:
            answer = self.env.api.post(
                f"/api/v1/messages/{chosen.message_id}/cancel", headers=church.headers
            )
        except httpx.HTTPError:
            return
        if answer.status_code == 200:
            chosen.cancelled = True

    @rule(church=st.integers(0, 1))
    def window_closes(self, church: int) -> None:
        """The church sets a window that opens in two hours (UTC): it is closed now."""
        self.tally["window_closes"] += 1
        if self.closed_since[church] is not None:
            return
        opens = datetime.now(UTC) + timedelta(hours=2)
        body = {
            "timezone": "UTC",
            "send_window_start": opens.strftime("%H:%M"),
            "send_window_end": (opens + timedelta(hours=1)).strftime("%H:%M"),
        }
        self.env.patch_church(self.env.churches[church], body)
        self.closed_since[church] = time.time()

    @rule(church=st.integers(0, 1))
    def window_opens(self, church: int) -> None:
        self.tally["window_opens"] += 1
        self._open_window(church)

    def _open_window(self, church: int) -> None:
        since = self.closed_since[church]
        if since is None:
            return
        self.env.patch_church(self.env.churches[church], ALWAYS_OPEN)
        self.closures[church].append((since, time.time()))
        self.closed_since[church] = None

    # --- what phones do ---------------------------------------------------------------

    @rule(
        church=st.integers(0, 1),
        member=st.integers(0, MEMBERS - 1),
        word=st.sampled_from(["STOP", " stop ", "HELP"]),
    )
    def inbound(self, church: int, member: int, word: str) -> None:
        self.tally["inbound"] += 1
        target = self.env.churches[church]
        phone = target.phones[member]
        answer = self.env.sandbox.post(
            "/sandbox/inbound", json={"from": phone, "to": target.number, "text": word}
        )
        acknowledged = answer.status_code == 202 and answer.json()["delivered_status"] == 200
        if acknowledged and word.strip() == "STOP":
            self.stopped.setdefault(phone, time.time())

    # --- what the provider does -------------------------------------------------------

    @rule(kind=st.sampled_from(sorted(FAULTS)))
    def provider_fault(self, kind: str) -> None:
        self.tally["provider_fault"] += 1
        self.env.sandbox.post("/sandbox/faults", json=FAULTS[kind])

    @rule()
    def provider_queue_full(self) -> None:
        self.tally["provider_queue_full"] += 1
        self.env.sandbox.post(
            "/sandbox/limits",
            json={"account_per_second": 5, "per_number_per_second": 2, "queue_max": 2},
        )

    @rule()
    def provider_recovers(self) -> None:
        self.tally["provider_recovers"] += 1
        self.env.sandbox.delete("/sandbox/faults")

    # --- what the infrastructure does ---------------------------------------------------

    @rule()
    def worker_killed(self) -> None:
        self.tally["worker_killed"] += 1
        self.env.worker.kill()
        self.env.worker.ensure_running()

    @rule(down=st.floats(0.5, 3.0))
    def postgres_restarted(self, down: float) -> None:
        self.tally["postgres_restarted"] += 1
        self.env.cluster.restart(down_seconds=down)

    @rule()
    def connections_dropped(self) -> None:
        self.tally["connections_dropped"] += 1
        self.env.sql(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE pid <> pg_backend_pid() AND datname = 'koinonia'"
        )

    @rule(seconds=st.floats(4.0, 10.0))
    def postgres_stopped_for_a_while(self, seconds: float) -> None:
        self.tally["postgres_stopped_for_a_while"] += 1
        self.env.cluster.stop()
        time.sleep(seconds)
        self.env.cluster.start()

    @rule(seconds=st.floats(0.2, 2.0))
    def time_passes(self, seconds: float) -> None:
        self.tally["time_passes"] += 1
        self.env.worker.ensure_running()  # the supervisor's job
        time.sleep(seconds)

    @invariant()
    def worker_supervised(self) -> None:
        self.env.worker.ensure_running()

    # --- the promises -------------------------------------------------------------------

    def teardown(self) -> None:
        env = self.env
        env.settle()
        for church in range(len(env.churches)):
            self._open_window(church)
        by_token = {b.token: b for b in self.broadcasts}
        for broadcast in self.broadcasts:
            if broadcast.message_id is None:  # did the create land? the token tells
                found = env.sql("SELECT id FROM messages WHERE body LIKE %s", f"{broadcast.token}%")
                broadcast.message_id = str(found[0][0]) if found else None
        live = [b for b in self.broadcasts if b.message_id and not b.cancelled]

        def all_finished() -> Any:
            if not live:
                return True
            rows = env.sql(
                "SELECT id::text, status FROM messages WHERE id = ANY(%s::uuid[])",
                [b.message_id for b in live],
            )
            unfinished = [r for r in rows if r[1] not in ("completed", "cancelled")]
            return not unfinished or None

        wait_for(all_finished, within=90, what="every accepted broadcast completes", every=0.5)
        log = env.sandbox.get("/sandbox/messages").json()["data"]
        texts = Counter()
        for text in log:
            token = text["text"].split(" ", 1)[0]
            if token in by_token:
                phone = text["to"][0]["phone_number"]
                texts[(token, phone)] += 1
                stopped_at = self.stopped.get(phone)
                accepted = datetime.fromisoformat(text["received_at"].replace("Z", "+00:00"))
                sent = by_token[token]
                if not sent.urgent:
                    at = accepted.timestamp()
                    for closed, reopened in self.closures[sent.church]:
                        assert not closed + WINDOW_GRACE_SECONDS < at < reopened, (
                            f"{token} went out {at - closed:.1f} s into a closed window"
                        )
                if stopped_at is not None:
                    assert accepted.timestamp() <= stopped_at + STOP_BOUND_SECONDS, (
                        f"texted {token} {accepted.timestamp() - stopped_at:.1f} s after STOP"
                    )
        self.tally["sequences"] += 1
        self.tally["broadcasts_checked"] += len(live)
        self.tally["texts_checked"] += sum(texts.values())
        twice = {key: n for key, n in texts.items() if n > 1}
        assert not twice, f"texted more than once: {twice}"
        for church in env.churches:
            net, billed = _ledger(env, church.id)
            assert net == billed, f"ledger {net} != billed + reserved {billed}"
        stats = env.sandbox.get("/sandbox/stats").json()
        assert stats["account"]["max_per_second"] <= 2 * ACCOUNT_RATE, stats["account"]
        for number, counts in stats["numbers"].items():
            assert counts["max_per_second"] <= 2 * NUMBER_RATE, (number, counts)


def _ledger(env: Environment, church_id: str) -> tuple[int, int]:
    church = uuid.UUID(church_id)
    net = env.sql(
        "SELECT coalesce(-sum(segments), 0) FROM usage_ledger WHERE church_id = %s "
        "AND kind IN ('debit', 'credit')",
        church,
    )[0][0]
    billed = env.sql(
        "SELECT coalesce(sum(segments), 0) FROM message_recipients WHERE church_id = %s "
        "AND status IN ('queued', 'sending', 'sent', 'delivered', 'undelivered', 'unconfirmed')",
        church,
    )[0][0]
    replies = env.sql(
        "SELECT coalesce(sum(segments), 0) FROM conversation_messages WHERE church_id = %s "
        "AND kind = 'reply' AND status <> 'failed'",
        church,
    )[0][0]
    return int(net), int(billed) + int(replies)


def test_sending_keeps_its_promises_under_random_sequences(environment: Environment) -> None:
    SendingModel.env = environment
    SendingModel.tally = Counter()
    examples = 20 if FULL else 6
    run_state_machine_as_test(
        SendingModel,
        settings=settings(
            max_examples=examples,
            stateful_step_count=30 if FULL else 15,
            deadline=None,
            derandomize=True,
            database=None,
            suppress_health_check=list(HealthCheck),
            print_blob=True,
        ),
    )
    tally = SendingModel.tally
    sys.stderr.write(f"model sequences: {dict(tally)}\n")
    # Not vacuous: sequences ran to their checks, and texts went out and were checked.
    assert tally["sequences"] >= examples
    assert tally["broadcasts_checked"] >= examples
    assert tally["texts_checked"] >= examples  # cancels and STOPs leave fewer than all
