#!/usr/bin/env bash
# Make sure PostgreSQL, Redis and RabbitMQ answer on their configured addresses,
# starting a local one that is installed but stopped. Then create the database if
# it is missing. Exits non-zero with one line naming what is missing.
#
#   scripts/services.sh            # check/start all three, create POSTGRES_DB
#   scripts/services.sh --no-db    # only the services
set -euo pipefail

cd "$(dirname "$0")/.."
# Values from .env (if any) without overriding the environment.
if [[ -f .env ]]; then
  while IFS='=' read -r key value; do
    [[ -z "$key" || "$key" == \#* ]] && continue
    [[ -z "${!key+x}" ]] && export "$key=$value"
  done < .env
fi

PGHOST_=${POSTGRES_HOST:-127.0.0.1}; PGPORT_=${POSTGRES_PORT:-5432}
REDIS_HOST_=${REDIS_HOST:-127.0.0.1}; REDIS_PORT_=${REDIS_PORT:-6379}
RMQ_HOST_=${RMQ_HOST:-127.0.0.1}; RMQ_PORT_=${RMQ_PORT:-5672}

compose_hint="or start them with: docker compose -f docker-compose.yml -f docker-compose.ports.yml up -d postgres redis rabbitmq"

answers() { # host port
  timeout 1 bash -c "exec 3<>/dev/tcp/$1/$2" 2>/dev/null
}

is_local() { [[ "$1" == 127.0.0.1 || "$1" == localhost || "$1" == ::1 ]]; }

wait_for() { # name host port seconds
  local i
  for ((i = 0; i < $4 * 4; i++)); do
    answers "$2" "$3" && return 0
    sleep 0.25
  done
  return 1
}

fail() { echo "services: $1 is not answering on $2 ($compose_hint)" >&2; exit 1; }

start_postgres() {
  command -v pg_ctlcluster >/dev/null || return 1
  local version
  version=$(ls /etc/postgresql 2>/dev/null | sort -V | tail -n 1)
  [[ -n "$version" ]] || return 1
  pg_ctlcluster --skip-systemctl-redirect "$version" main start >/dev/null 2>&1 || true
}

start_redis() {
  command -v redis-server >/dev/null || return 1
  mkdir -p /var/lib/redis /var/log/redis 2>/dev/null || true
  redis-server --daemonize yes --bind 127.0.0.1 -::1 --port "$REDIS_PORT_" --save "" \
    --appendonly no --dir /var/lib/redis --logfile /var/log/redis/ci.log >/dev/null 2>&1 || true
}

start_rabbitmq() {
  command -v rabbitmq-server >/dev/null || return 1
  # A node that runs with its app stopped (rabbitmqctl stop_app) only needs start_app.
  if command -v rabbitmqctl >/dev/null && timeout 10 rabbitmqctl -q ping >/dev/null 2>&1; then
    timeout 30 rabbitmqctl -q start_app >/dev/null 2>&1 || true
  else
    rabbitmq-server -detached >/dev/null 2>&1 || true
  fi
}

ensure() { # name host port starter seconds
  local name=$1 host=$2 port=$3 starter=$4 seconds=$5
  answers "$host" "$port" && return 0
  if is_local "$host"; then
    echo "services: $name is down on $host:$port, starting it" >&2
    $starter || fail "$name" "$host:$port (not installed here)"
    wait_for "$name" "$host" "$port" "$seconds" || fail "$name" "$host:$port"
  else
    fail "$name" "$host:$port"
  fi
}

# POSTGRES_HOSTS (a primary and its standbys): check the nodes, never start a local
# server for them; create-database and the migrations then run on the primary the
# service finds among them (target_session_attrs=read-write).
check_postgres_nodes() {
  local entry host port up=() down=()
  IFS=',' read -ra entries <<<"$POSTGRES_HOSTS"
  for entry in "${entries[@]}"; do
    entry=${entry//[[:space:]]/}
    [[ -z "$entry" ]] && continue
    if [[ "$entry" =~ ^\[(.*)\](:([0-9]+))?$ ]]; then
      host=${BASH_REMATCH[1]}; port=${BASH_REMATCH[3]:-$PGPORT_}
    elif [[ "$entry" == *:* ]]; then
      host=${entry%%:*}; port=${entry##*:}
    else
      host=$entry; port=$PGPORT_
    fi
    if answers "$host" "$port"; then up+=("$entry"); else down+=("$entry"); fi
  done
  ((${#up[@]})) || fail "PostgreSQL (POSTGRES_HOSTS)" "any of ${POSTGRES_HOSTS}"
  if ((${#down[@]})); then
    echo "services: PostgreSQL nodes not answering: ${down[*]} (continuing with ${up[*]})" >&2
  fi
}

if [[ -n "${POSTGRES_HOSTS:-}" ]]; then
  check_postgres_nodes
else
  ensure PostgreSQL "$PGHOST_" "$PGPORT_" start_postgres 30
fi
check_redis_nodes() { # REDIS_MODE: never start a local Redis for REDIS_HOST; one node must answer
  local node host port answered=0
  [[ -n "${REDIS_NODES:-}" ]] || {
    echo "services: REDIS_NODES is required when REDIS_MODE=$REDIS_MODE_" >&2
    exit 1
  }
  IFS=',' read -ra nodes <<<"$REDIS_NODES"
  for node in "${nodes[@]}"; do
    node=${node// /}
    host=${node%:*}; host=${host#[}; host=${host%]}
    port=${node##*:}
    if answers "$host" "$port"; then
      answered=1
    else
      echo "services: Redis $REDIS_MODE_ node $node is not answering" >&2
    fi
  done
  ((answered)) || fail "Redis ($REDIS_MODE_)" "any of REDIS_NODES=$REDIS_NODES"
}

REDIS_MODE_=${REDIS_MODE:-standalone}
case "$REDIS_MODE_" in
  standalone) ensure Redis "$REDIS_HOST_" "$REDIS_PORT_" start_redis 15 ;;
  sentinel | cluster) check_redis_nodes ;;
  *) echo "services: REDIS_MODE must be standalone, sentinel or cluster" >&2; exit 1 ;;
esac
if [[ -n "${RMQ_HOSTS:-}" ]]; then
  # A cluster: one answering node is enough to start (the service fails over between
  # them); a cluster is never started from here.
  rmq_up=""
  IFS=',' read -ra rmq_nodes <<< "$RMQ_HOSTS"
  for node in "${rmq_nodes[@]}"; do
    node=${node// /}; host=${node%:*}; port=${node##*:}
    [[ "$node" == *:* ]] || port=$RMQ_PORT_
    answers "$host" "$port" && { rmq_up=1; break; }
  done
  [[ -n "$rmq_up" ]] || fail RabbitMQ "no node of RMQ_HOSTS=$RMQ_HOSTS"
else
  ensure RabbitMQ "$RMQ_HOST_" "$RMQ_PORT_" start_rabbitmq 60
fi

if [[ "${1:-}" != "--no-db" ]]; then
  uv run --frozen python -m api.cli create-database
fi
