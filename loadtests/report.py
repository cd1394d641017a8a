"""Per-endpoint figures from an artillery JSON report (`artillery run --output FILE`).

Artillery's `metrics-by-endpoint` plugin (on in workload.yml, by request name) counts
`plugins.metrics-by-endpoint.<name>.codes.<status>` and `.errors.<code>` and keeps the
histogram `plugins.metrics-by-endpoint.response_time.<name>` (time to first byte, ms).
The whole run's figures are `http.codes.<status>`, `errors.<code>` and `vusers.*`.

    .venv/bin/python -m loadtests.report REPORT.json    # the table of a kept report
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PREFIX = "plugins.metrics-by-endpoint."
TIMES = PREFIX + "response_time."


@dataclass
class Endpoint:
    name: str
    codes: dict[int, int] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)
    p50: float = math.nan
    p95: float = math.nan
    p99: float = math.nan
    max: float = math.nan

    @property
    def answered(self) -> int:
        return sum(self.codes.values())

    @property
    def requests(self) -> int:
        return self.answered + sum(self.errors.values())

    @property
    def server_errors(self) -> int:
        return sum(n for code, n in self.codes.items() if code >= 500)

    @property
    def client_errors(self) -> int:
        return sum(n for code, n in self.codes.items() if 400 <= code < 500)


@dataclass
class Summary:
    endpoints: list[Endpoint]
    total: Endpoint
    seconds: float
    vusers_created: int
    vusers_failed: int

    @property
    def failures(self) -> list[str]:
        """Why the run fails: any 5xx, any request that got no answer (ETIMEDOUT,
        ECONNREFUSED, ECONNRESET, …), any virtual user that failed, or no request at all."""
        problems = []
        if self.total.requests == 0:
            problems.append("no request was made")
        if self.total.server_errors:
            codes = {c: n for c, n in self.total.codes.items() if c >= 500}
            problems.append(f"{self.total.server_errors} answers were 5xx {codes}")
        if self.total.errors:
            problems.append(f"requests without an answer: {self.total.errors}")
        if self.vusers_failed and not self.total.errors:
            problems.append(f"{self.vusers_failed} virtual users failed")
        return problems

    @property
    def unexpected_4xx(self) -> str:
        if not self.total.client_errors:
            return ""
        parts = [
            f"{e.name}: { ({c: n for c, n in e.codes.items() if 400 <= c < 500}) }"
            for e in self.endpoints
            if e.client_errors
        ]
        return f"{self.total.client_errors} answers were 4xx ({'; '.join(parts)})"


def _split(counter: str) -> tuple[str, str, str] | None:
    """`<prefix><name>.codes.200` → (name, "codes", "200"); None for other counters."""
    if not counter.startswith(PREFIX) or counter.startswith(TIMES):
        return None
    rest = counter.removeprefix(PREFIX)
    for kind in ("codes", "errors"):
        name, sep, value = rest.rpartition(f".{kind}.")
        if sep:
            return name, kind, value
    return None


def summarise(report: dict[str, Any], order: Iterable[str] = ()) -> Summary:
    aggregate = report["aggregate"]
    counters: dict[str, int] = aggregate.get("counters", {})
    summaries: dict[str, dict[str, float]] = aggregate.get("summaries", {})
    found: dict[str, Endpoint] = {name: Endpoint(name) for name in order}
    for counter, value in counters.items():
        parts = _split(counter)
        if parts is None:
            continue
        name, kind, key = parts
        endpoint = found.setdefault(name, Endpoint(name))
        if kind == "codes":
            endpoint.codes[int(key)] = endpoint.codes.get(int(key), 0) + int(value)
        else:
            endpoint.errors[key] = endpoint.errors.get(key, 0) + int(value)
    for key, values in summaries.items():
        if key.startswith(TIMES):
            endpoint = found.setdefault(key.removeprefix(TIMES), Endpoint(key.removeprefix(TIMES)))
            _times(endpoint, values)

    total = Endpoint("all requests")
    for counter, value in counters.items():
        if counter.startswith("http.codes."):
            total.codes[int(counter.removeprefix("http.codes."))] = int(value)
        elif counter.startswith("errors."):
            total.errors[counter.removeprefix("errors.")] = int(value)
    if "http.response_time" in summaries:
        _times(total, summaries["http.response_time"])
    first, last = aggregate.get("firstCounterAt"), aggregate.get("lastCounterAt")
    seconds = (last - first) / 1000 if first and last and last > first else math.nan
    return Summary(
        endpoints=list(found.values()),
        total=total,
        seconds=seconds,
        vusers_created=int(counters.get("vusers.created", 0)),
        vusers_failed=int(counters.get("vusers.failed", 0)),
    )


def _times(endpoint: Endpoint, values: dict[str, float]) -> None:
    endpoint.p50 = float(values.get("p50", values.get("median", math.nan)))
    endpoint.p95 = float(values.get("p95", math.nan))
    endpoint.p99 = float(values.get("p99", math.nan))
    endpoint.max = float(values.get("max", math.nan))


def _ms(value: float) -> str:
    return "–" if math.isnan(value) else f"{value:.0f}" if value >= 10 else f"{value:.1f}"


def _codes(codes: dict[int, int]) -> str:
    return " ".join(f"{code}: {n:,}" for code, n in sorted(codes.items())) or "–"


def _errors(endpoint: Endpoint) -> str:
    parts = [f"{code}: {n:,}" for code, n in sorted(endpoint.errors.items())]
    if endpoint.server_errors:
        parts.insert(0, f"5xx: {endpoint.server_errors:,}")
    return " ".join(parts) or "0"


def table(summary: Summary) -> str:
    """A Markdown table (aligned, so it reads in a terminal too)."""
    header = ["endpoint", "requests", "req/s", "p50 ms", "p95 ms", "p99 ms", "max ms"]
    header += ["status codes", "errors"]
    rows = []
    for endpoint in [*summary.endpoints, summary.total]:
        rate = endpoint.requests / summary.seconds if summary.seconds > 0 else math.nan
        rows.append(
            [
                endpoint.name,
                f"{endpoint.requests:,}",
                "–" if math.isnan(rate) else f"{rate:.1f}",
                _ms(endpoint.p50),
                _ms(endpoint.p95),
                _ms(endpoint.p99),
                _ms(endpoint.max),
                _codes(endpoint.codes),
                _errors(endpoint),
            ]
        )
    rows[-1][0] = f"**{rows[-1][0]}**"
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    numeric = {1, 2, 3, 4, 5, 6}

    def line(cells: list[str]) -> str:
        padded = [
            c.rjust(widths[i]) if i in numeric else c.ljust(widths[i]) for i, c in enumerate(cells)
        ]
        return "| " + " | ".join(padded) + " |"

    rule = (
        "|"
        + "|".join(
            ("-" * (w + 1) + ":") if i in numeric else "-" * (w + 2) for i, w in enumerate(widths)
        )
        + "|"
    )
    return "\n".join([line(header), rule, *(line(r) for r in rows)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("report", type=Path, help="artillery's JSON report")
    args = parser.parse_args()
    summary = summarise(json.loads(args.report.read_text()))
    print(table(summary))
    for problem in summary.failures:
        print(f"FAILED: {problem}")
    raise SystemExit(1 if summary.failures else 0)


if __name__ == "__main__":
    main()
