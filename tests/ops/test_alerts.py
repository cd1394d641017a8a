"""The alert rules and the dashboard: promtool's checks and unit tests, every metric they
use exported by the API or a worker, every expression accepted by a real Prometheus, and a
runbook for every alert.

promtool and prometheus come from Debian's `prometheus` package (`scripts/promtool.sh`,
run by `scripts/test`). The Prometheus started here has its own configuration, data
directory and free port; the packaged service is never used.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.ops.stack import Stack, ops_stack, wait_until  # noqa: F401 (fixture)
from tests.support.servers import free_port

pytestmark = pytest.mark.nopgbouncer  # no database in the rules: one pass is enough

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS_DIR = ROOT / "deploy" / "prometheus"
RULES = PROMETHEUS_DIR / "rules.yml"
RULES_TEST = PROMETHEUS_DIR / "rules_test.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "koinonia.json"
RUNBOOKS = ROOT / "docs" / "runbooks"
METRIC = re.compile(r"\bkoinonia_[a-zA-Z0-9_]+")
# Grafana's own variables, as a dashboard query would get them.
GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "1h"}
RUNBOOK_SECTIONS = ("## What it means", "## What to look at", "## Commands", "## Fix")


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is missing: run scripts/promtool.sh (scripts/test does)")
    return path


def _rules() -> list[dict[str, Any]]:
    document = yaml.safe_load(RULES.read_text())
    return [rule for group in document["groups"] for rule in group["rules"]]


def _alerts() -> list[dict[str, Any]]:
    return [rule for rule in _rules() if "alert" in rule]


def _panel_expressions() -> list[tuple[str, str]]:
    """(panel title, expression) of every query in the dashboard, rows' panels included."""
    found: list[tuple[str, str]] = []

    def walk(panels: list[dict[str, Any]]) -> None:
        for panel in panels:
            for target in panel.get("targets", []):
                if target.get("expr"):
                    found.append((str(panel.get("title")), str(target["expr"])))
            walk(panel.get("panels", []))

    walk(json.loads(DASHBOARD.read_text())["panels"])
    return found


def _grafana_to_promql(expression: str) -> str:
    for variable, value in GRAFANA_VARIABLES.items():
        expression = expression.replace(variable, value)
    return expression


def test_promtool_checks_the_rules_and_runs_their_unit_tests() -> None:
    promtool = _tool("promtool")
    checked = subprocess.run(
        [promtool, "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    tested = subprocess.run(
        [promtool, "test", "rules", RULES_TEST.name],
        cwd=PROMETHEUS_DIR,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert tested.returncode == 0, tested.stdout + tested.stderr


def test_every_alert_has_a_unit_test_where_it_fires() -> None:
    cases = yaml.safe_load(RULES_TEST.read_text())["tests"]
    firing = {
        check["alertname"]
        for case in cases
        for check in case.get("alert_rule_test", [])
        if check.get("exp_alerts")
    }
    quiet = {
        check["alertname"]
        for case in cases
        for check in case.get("alert_rule_test", [])
        if not check.get("exp_alerts")
    }
    names = {rule["alert"] for rule in _alerts()}
    assert names - firing == set(), "alerts never shown firing"
    assert names - quiet == set(), "alerts never shown quiet"


def test_every_alert_links_its_runbook() -> None:
    for rule in _alerts():
        name = rule["alert"]
        assert rule["annotations"]["runbook_url"] == f"docs/runbooks/{name}.md", name
        assert rule["labels"]["severity"] in ("critical", "warning"), name
        runbook = RUNBOOKS / f"{name}.md"
        assert runbook.is_file(), f"no runbook for {name}"
        text = runbook.read_text()
        assert text.startswith(f"# {name}"), runbook
        for section in RUNBOOK_SECTIONS:
            assert section in text, f"{runbook.name} lacks {section!r}"
    documented = {path.stem for path in RUNBOOKS.glob("*.md")} - {"README"}
    assert documented - {rule["alert"] for rule in _alerts()} == set(), "runbooks for no alert"


def _help_names(metrics: str) -> set[str]:
    return {line.split()[2] for line in metrics.splitlines() if line.startswith("# HELP ")}


def _exported(name: str, helps: set[str]) -> bool:
    if name in helps:
        return True
    base = re.sub(r"_(bucket|count|sum)$", "", name)  # a histogram's series
    return base in helps


def test_every_metric_used_is_exported_by_the_api_or_a_worker(ops_stack: Stack) -> None:  # noqa: F811
    api = httpx.get(f"{ops_stack.api_url}/metrics", timeout=10)
    worker = httpx.get(ops_stack.worker_metrics_url, timeout=10)
    assert api.status_code == 200 and worker.status_code == 200
    helps = _help_names(api.text) | _help_names(worker.text)
    used: dict[str, set[str]] = {}
    for rule in _rules():
        for name in METRIC.findall(rule["expr"]):
            used.setdefault(name, set()).add(f"rule {rule.get('alert') or rule.get('record')}")
    for title, expression in _panel_expressions():
        for name in METRIC.findall(expression):
            used.setdefault(name, set()).add(f"panel {title!r}")
    assert used, "no metric names found"
    missing = {name: sorted(where) for name, where in used.items() if not _exported(name, helps)}
    assert missing == {}, "used but not on the API's or the worker's /metrics"
    # The worker serves what only it knows.
    worker_helps = _help_names(worker.text)
    for name in (
        "koinonia_queue_oldest_ready_age_seconds",
        "koinonia_job_duration_seconds",
        "koinonia_worker_restarts_total",
        "koinonia_sms_sends_total",
    ):
        assert name in worker_helps, name


@pytest.fixture(scope="module")
def prometheus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A Prometheus of our own: own config (our rules, no scrape targets), data dir, port."""
    binary = _tool("prometheus")
    directory = tmp_path_factory.mktemp("prometheus")
    shutil.copy(RULES, directory / "rules.yml")
    config = directory / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 15s\n  evaluation_interval: 15s\n"
        "rule_files:\n  - rules.yml\nscrape_configs: []\n"
    )
    port = free_port()
    log = (directory / "prometheus.log").open("wb")
    process = subprocess.Popen(
        [
            binary,
            f"--config.file={config}",
            f"--storage.tsdb.path={directory / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--storage.tsdb.retention.time=1h",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        assert process.poll() is None, (directory / "prometheus.log").read_text()[-3000:]
        try:
            return httpx.get(f"{url}/-/ready", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_until(ready, within=30, what="prometheus /-/ready")
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


def test_every_expression_parses_in_prometheus(prometheus: str) -> None:
    expressions = [(f"rule {r.get('alert')}", str(r["expr"])) for r in _rules()]
    expressions += [
        (f"panel {title!r}", _grafana_to_promql(e)) for title, e in _panel_expressions()
    ]
    failures = []
    with httpx.Client(base_url=prometheus, timeout=10) as client:
        for where, expression in expressions:
            answer = client.get("/api/v1/query", params={"query": expression}).json()
            if answer.get("status") != "success":
                failures.append((where, answer.get("error")))
        # Prometheus loaded the rules file itself, every group of it.
        groups = client.get("/api/v1/rules").json()["data"]["groups"]
    assert failures == []
    loaded = {rule["name"] for group in groups for rule in group["rules"]}
    assert loaded == {rule["alert"] for rule in _alerts()}


def test_the_dashboard_covers_requests_sending_billing_and_the_database() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    rows = [p["title"] for p in dashboard["panels"] if p.get("type") == "row"]
    for wanted in ("Requests", "Sending", "Billing", "Database"):
        assert any(title.startswith(wanted) for title in rows), (wanted, rows)
    assert len(_panel_expressions()) >= 20
    assert dashboard["uid"] == "koinonia"
