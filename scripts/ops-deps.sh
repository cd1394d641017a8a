#!/usr/bin/env bash
# Installs the system packages the backup tooling and the restore drill need:
# pgBackRest (backups, WAL archiving, restore) and stunnel4 (HTTPS in front of the local
# S3 API server, since pgBackRest speaks only HTTPS to S3). Idempotent; `apt-get update`
# runs only when a package is missing and apt cannot find it.
set -euo pipefail

missing=()
command -v pgbackrest >/dev/null || missing+=(pgbackrest)
command -v stunnel4 >/dev/null || command -v stunnel >/dev/null || missing+=(stunnel4)
command -v openssl >/dev/null || missing+=(openssl)
[ ${#missing[@]} -eq 0 ] && exit 0

export DEBIAN_FRONTEND=noninteractive
echo "installing ${missing[*]}"
if ! apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null 2>&1; then
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
