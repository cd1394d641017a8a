#!/usr/bin/env bash
# Starts a PgBouncer in transaction mode in front of the local PostgreSQL.
# Usage: scripts/pgbouncer.sh start|stop [PORT]   (default port 6432)
set -euo pipefail
action=${1:-start}
port=${2:-6432}
dir=${PGBOUNCER_DIR:-/tmp/koinonia-pgbouncer-$port}
pg_host=${PGBOUNCER_PG_HOST:-127.0.0.1}
pg_port=${PGBOUNCER_PG_PORT:-5432}

case "$action" in
start)
  if ! command -v pgbouncer >/dev/null; then
    apt-get install -y -qq pgbouncer >/dev/null || { apt-get update -qq && apt-get install -y -qq pgbouncer >/dev/null; }
  fi
  mkdir -p "$dir"
  cat >"$dir/pgbouncer.ini" <<INI
[databases]
* = host=$pg_host port=$pg_port
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $port
unix_socket_dir = $dir
auth_type = trust
auth_file = $dir/userlist.txt
pool_mode = transaction
max_client_conn = 1000
default_pool_size = 40
server_reset_query =
ignore_startup_parameters = extra_float_digits,options
logfile = $dir/pgbouncer.log
pidfile = $dir/pgbouncer.pid
INI
  echo '"postgres" ""' >"$dir/userlist.txt"
  # PgBouncer refuses to run as root.
  chown -R postgres:postgres "$dir" 2>/dev/null || true
  if [ -f "$dir/pgbouncer.pid" ] && kill -0 "$(cat "$dir/pgbouncer.pid")" 2>/dev/null; then
    echo "pgbouncer already running on $port"; exit 0
  fi
  if [ "$(id -u)" = 0 ]; then
    su postgres -s /bin/sh -c "pgbouncer -d '$dir/pgbouncer.ini'"
  else
    pgbouncer -d "$dir/pgbouncer.ini"
  fi
  for _ in $(seq 50); do
    pg_isready -q -h 127.0.0.1 -p "$port" && { echo "pgbouncer listening on $port"; exit 0; }
    sleep 0.1
  done
  echo "pgbouncer did not start; log:" >&2; cat "$dir/pgbouncer.log" >&2; exit 1
  ;;
stop)
  [ -f "$dir/pgbouncer.pid" ] && kill "$(cat "$dir/pgbouncer.pid")" 2>/dev/null || true
  ;;
*) echo "usage: $0 start|stop [port]" >&2; exit 2 ;;
esac
