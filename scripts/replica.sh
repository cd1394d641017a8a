#!/usr/bin/env bash
# Starts a streaming read replica of the local PostgreSQL (a second cluster, port 5433).
# Usage: scripts/replica.sh start|stop   Idempotent.
set -euo pipefail
action=${1:-start}
port=${REPLICA_PORT:-5433}
version=$(ls /etc/postgresql | sort -V | tail -1)
name=replica
hba=/etc/postgresql/$version/main/pg_hba.conf

case "$action" in
start)
  if pg_isready -q -h 127.0.0.1 -p "$port"; then echo "replica already on $port"; exit 0; fi
  if ! grep -qE '^host\s+replication\s+all\s+127.0.0.1/32\s+trust' "$hba"; then
    echo "host replication all 127.0.0.1/32 trust" >>"$hba"
    pg_ctlcluster --skip-systemctl-redirect "$version" main reload
  fi
  if ! pg_lsclusters -h | awk '{print $2}' | grep -qx "$name"; then
    pg_createcluster "$version" "$name" -p "$port" >/dev/null
    datadir=/var/lib/postgresql/$version/$name
    rm -rf "$datadir"
    install -d -o postgres -g postgres -m 700 "$datadir"
    su postgres -s /bin/sh -c "pg_basebackup -h 127.0.0.1 -p 5432 -U postgres -D '$datadir' -R -X stream -c fast"
    echo "listen_addresses = '127.0.0.1'" >>"/etc/postgresql/$version/$name/postgresql.conf"
    cp "$hba" "/etc/postgresql/$version/$name/pg_hba.conf"
  fi
  pg_ctlcluster --skip-systemctl-redirect "$version" "$name" start
  for _ in $(seq 60); do pg_isready -q -h 127.0.0.1 -p "$port" && break; sleep 0.5; done
  psql -h 127.0.0.1 -p "$port" -U postgres -tAc "SELECT 'replica in recovery: ' || pg_is_in_recovery()"
  ;;
stop)
  pg_ctlcluster --skip-systemctl-redirect "$version" "$name" stop 2>/dev/null || true
  ;;
*) echo "usage: $0 start|stop" >&2; exit 2 ;;
esac
