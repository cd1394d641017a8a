"""CSV import: inline and as a job, per-row errors, de-duplication, groups, the CLI."""

from __future__ import annotations

import io
import subprocess
import sys
from typing import Any

import httpx

from koinonia.app import create_app
from koinonia.jobs import build_job_app, open_resources
from koinonia.settings import Settings
from tests.conftest import make_settings
from tests.support.api import Account, add_member, register

CSV = (
    "First Name,Last Name,Mobile,Email\n"
    "Ada,Lovelace,(415) 555-0101,ada@example.org\n"
    "Grace,Hopper,415-555-0102,\n"
    "Bad,Phone,12345,\n"
    "Bad,Email,415 555 0103,not-an-email\n"
    "Dup,Licate,+1 415 555 0101,\n"
    "\n"
    "Alan,Turing,4155550104,alan@example.org\n"
)


async def _upload(
    client: httpx.AsyncClient, account: Account, content: str | bytes, **form: str
) -> httpx.Response:
    data = content.encode() if isinstance(content, str) else content
    return await client.post(
        "/api/v1/members/import",
        files={"file": ("people.csv", data, "text/csv")},
        data=form,
        headers=account.headers,
    )


async def test_inline_import_reports_row_errors(client: httpx.AsyncClient, owner: Account) -> None:
    response = await _upload(client, owner, CSV)
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["status"] == "completed"
    assert (body["processed"], body["created"], body["updated"], body["skipped"]) == (6, 3, 0, 3)
    errors = {(e["row"], e["field"]) for e in body["errors"]}
    assert errors == {(4, "phone"), (5, "email"), (6, "phone")}
    assert any("duplicate of row 2" in e["message"] for e in body["errors"])
    progress = await client.get(f"/api/v1/members/imports/{body['id']}", headers=owner.headers)
    assert progress.json() == body
    members = (await client.get("/api/v1/members", headers=owner.headers)).json()["data"]
    phones = {m["phone"] for m in members}
    assert phones == {"+14155550101", "+14155550102", "+14155550104"}
    ada = next(m for m in members if m["first_name"] == "Ada")
    assert ada["email"] == "ada@example.org"


async def test_update_or_skip_existing_and_group_assignment(
    client: httpx.AsyncClient, owner: Account
) -> None:
    existing = await add_member(client, owner, phone="+14155550201", first_name="Old")
    group = (
        await client.post("/api/v1/groups", json={"name": "Imported"}, headers=owner.headers)
    ).json()
    content = "phone,first_name\n+14155550201,New\n+14155550202,Fresh\n"
    skipped = await _upload(client, owner, content, on_duplicate="skip", group_id=group["id"])
    body = skipped.json()
    assert (body["created"], body["updated"], body["skipped"]) == (1, 0, 1)
    member = (await client.get(f"/api/v1/members/{existing['id']}", headers=owner.headers)).json()
    assert member["first_name"] == "Old"
    count = (await client.get(f"/api/v1/groups/{group['id']}", headers=owner.headers)).json()
    assert count["member_count"] == 2  # existing members join the group in skip mode too
    updated = await _upload(client, owner, content, on_duplicate="update")
    assert (updated.json()["created"], updated.json()["updated"]) == (0, 2)
    member = (await client.get(f"/api/v1/members/{existing['id']}", headers=owner.headers)).json()
    assert member["first_name"] == "New"


async def test_whole_file_problems(client: httpx.AsyncClient, owner: Account) -> None:
    no_phone = await _upload(client, owner, "name,email\nAda,a@b.org\n")
    assert no_phone.json()["status"] == "failed"
    assert "no phone column" in no_phone.json()["failure"]
    not_utf8 = await _upload(client, owner, b"phone\n" + b"\xff\xfe\x00bad\n")
    assert not_utf8.json()["status"] == "failed"
    mapped = await _upload(
        client, owner, "Cell,Who\n4155550301,Zed\n", column_map='{"phone": "Cell", "name": "Who"}'
    )
    assert mapped.json()["created"] == 1
    bad_map = await _upload(client, owner, "Cell\n1\n", column_map="[1]")
    assert bad_map.status_code == 422
    bad_mode = await _upload(client, owner, "phone\n", on_duplicate="merge")
    assert bad_mode.status_code == 422


async def test_import_size_limit(settings: Settings, redis: Any) -> None:
    app = create_app(make_settings(database_url=settings.database_url, max_import_bytes=2048))
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client,
    ):
        account = await register(client)
        response = await _upload(client, account, "phone\n" + "4155550101\n" * 400)
    assert response.status_code == 413
    assert response.json()["code"] == "payload_too_large"


async def test_big_import_runs_as_a_job_with_progress(settings: Settings, redis: Any) -> None:
    job_settings = make_settings(database_url=settings.database_url, import_inline_max_bytes=10)
    app = create_app(job_settings)
    rows = "".join(f"Person{i},+1415555{i:04d}\n" for i in range(2000))
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client,
    ):
        account = await register(client)
        accepted = await _upload(client, account, "name,phone\n" + rows)
        assert accepted.status_code == 202, accepted.text
        assert accepted.json()["status"] == "pending"
        url = accepted.headers["Location"]
        job_app = build_job_app(job_settings)
        async with job_app.open_async(), open_resources(job_settings, job_app):
            await job_app.run_worker_async(queues=["imports"], wait=False)
        done = (await client.get(url, headers=account.headers)).json()
    assert done["status"] == "completed", done
    valid = done["created"]
    assert done["processed"] == 2000
    assert valid + done["skipped"] == 2000 and valid > 1000
    assert done["error_count"] == 2000 - valid


def test_cli_import_with_progress(settings: Settings, tmp_path: Any, owner: Account) -> None:
    path = tmp_path / "people.csv"
    path.write_text("phone,first_name\n4155550401,Cli\n4155550402,Cli\nbad,Row\n")
    env = {
        "DATABASE_URL": settings.database_url,
        "REDIS_URL": settings.redis_url,
        "KOINONIA_ENV": "test",
        "PATH": "/usr/bin:/bin",
    }
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "koinonia",
            "members",
            "import",
            str(path),
            "--church",
            owner.church_id,
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "created 2" in result.stdout and "errors 1" in result.stdout
    assert "row 4: phone" in result.stdout
    missing = subprocess.run(
        [
            sys.executable,
            "-m",
            "koinonia",
            "members",
            "import",
            str(path),
            "--church",
            "00000000-0000-0000-0000-000000000000",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert missing.returncode != 0
    assert io.StringIO(missing.stderr).read()
