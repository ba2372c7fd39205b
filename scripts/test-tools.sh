#!/usr/bin/env bash
# Tools the test suite runs privately (tests/pg_cluster.py): the PostgreSQL 15 server
# binaries and PgBouncer. Installs PgBouncer when it is missing (as root with apt-get),
# without letting the package's own service run on 6432: the tests start their own.
set -euo pipefail

PG_BIN=/usr/lib/postgresql/15/bin
if [[ ! -x "$PG_BIN/initdb" || ! -x "$PG_BIN/pg_basebackup" ]]; then
  echo "test-tools: the PostgreSQL 15 server binaries are missing ($PG_BIN): apt-get install -y postgresql-15" >&2
  exit 1
fi

command -v pgbouncer >/dev/null 2>&1 && exit 0
if [[ $(id -u) -ne 0 ]] || ! command -v apt-get >/dev/null 2>&1; then
  echo "test-tools: pgbouncer is missing and cannot be installed here: apt-get install -y pgbouncer" >&2
  exit 1
fi
echo "test-tools: pgbouncer is missing: apt-get install -y pgbouncer" >&2
policy=/usr/sbin/policy-rc.d
if [[ ! -e "$policy" ]]; then
  # Deny service starts during the install (Debian's documented hook), removed afterwards.
  printf '#!/bin/sh\nexit 101\n' >"$policy"
  chmod +x "$policy"
  trap 'rm -f "$policy"' EXIT
fi
export DEBIAN_FRONTEND=noninteractive
if ! apt-get install -y -q pgbouncer >/dev/null 2>&1; then
  apt-get update -q >/dev/null 2>&1 || true
  apt-get install -y -q pgbouncer >/dev/null || {
    echo "test-tools: apt-get install -y pgbouncer failed: install it by hand" >&2
    exit 1
  }
fi
# Nor at boot; and stop one that started anyway.
if command -v systemctl >/dev/null 2>&1; then
  systemctl disable pgbouncer >/dev/null 2>&1 || true
  systemctl stop pgbouncer >/dev/null 2>&1 || true
fi
if command -v update-rc.d >/dev/null 2>&1; then
  update-rc.d pgbouncer disable >/dev/null 2>&1 || true
fi
if [[ -x /etc/init.d/pgbouncer ]]; then
  /etc/init.d/pgbouncer stop >/dev/null 2>&1 || true
fi
