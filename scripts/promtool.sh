#!/usr/bin/env bash
# Makes `promtool` and the `prometheus` binary available for the alert-rule tests
# (tests/ops/test_alerts.py): Debian's `prometheus` package ships both. Idempotent.
#
# The tests start their own Prometheus (own config, free port, own data directory); the
# packaged service is never used, so if the package started it, it is stopped and disabled.
set -euo pipefail

if command -v promtool >/dev/null && command -v prometheus >/dev/null; then
  exit 0
fi

export DEBIAN_FRONTEND=noninteractive
echo "installing prometheus (for promtool)"
if ! apt-get install -y -qq --no-install-recommends prometheus >/dev/null 2>&1; then
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends prometheus >/dev/null
fi

# The package enables and starts its service where it can; we want neither.
if command -v systemctl >/dev/null && [ -d /run/systemd/system ]; then
  systemctl disable --now prometheus >/dev/null 2>&1 || true
fi
if [ -x /etc/init.d/prometheus ]; then
  /etc/init.d/prometheus stop >/dev/null 2>&1 || true
  update-rc.d prometheus disable >/dev/null 2>&1 || true
fi
command -v promtool >/dev/null
