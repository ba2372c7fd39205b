#!/usr/bin/env bash
# `make compose-test`: the container stack as a user runs it, proven end to end.
#
# Builds the image, brings the whole stack up (migration job, API, worker, rpc-echo,
# PostgreSQL, Redis, RabbitMQ), waits until it is healthy, registers, logs in, places
# an order, reads that order's event off the events queue from inside the stack's
# network, calls /v1/redirect/echo/... answered by rpc-echo, and takes everything down
# again (volumes included). On a failure it prints the services' logs and exits 1.
#
# Its own compose project and API port, so it never meets another stack or the
# machine's own services: COMPOSE_TEST_PROJECT (default orders-compose-test),
# COMPOSE_TEST_API_PORT (default 18080). Needs a Docker engine and compose v2
# (`docker compose`) or v1.29 (`docker-compose`).
set -euo pipefail
cd "$(dirname "$0")/.."

project=${COMPOSE_TEST_PROJECT:-orders-compose-test}
api_port=${COMPOSE_TEST_API_PORT:-18080}
base="http://127.0.0.1:${api_port}"
started=$(date +%s.%N)
step_started=$started
work=$(mktemp -d)
: >"$work/empty.env"

elapsed() { awk -v now="$(date +%s.%N)" -v since="$1" 'BEGIN { printf "%6.1f", now - since }'; }
say() { printf 'compose-test [%ss] %s\n' "$(elapsed "$started")" "$*"; }
step() { step_started=$(date +%s.%N); say "$*"; }
done_step() { say "  ok ($(elapsed "$step_started" | tr -d ' ') s)${1:+: $1}"; }
die() { printf 'compose-test: FAILED: %s\n' "$*" >&2; exit 1; }

docker info >/dev/null 2>&1 || die "no Docker engine answers (docker info failed)"
if docker compose version >/dev/null 2>&1; then
  compose_cmd=(docker compose)
elif command -v docker-compose >/dev/null 2>&1; then
  compose_cmd=(docker-compose)
else
  die "neither 'docker compose' (v2) nor 'docker-compose' (v1.29) is installed"
fi
# The project's defaults only: a developer's .env (host addresses, other ports) stays out.
compose() { API_PORT=$api_port "${compose_cmd[@]}" --env-file "$work/empty.env" -p "$project" -f docker-compose.yml "$@"; }

finish() {
  local status=$?
  trap - EXIT
  if ((status != 0)); then
    printf '\ncompose-test: the services as they are now\n' >&2
    compose ps >&2 || true
    printf '\ncompose-test: the services logs (last 150 lines each)\n' >&2
    compose logs --no-color --tail=150 >&2 || true
  fi
  step "down -v (containers, network and volumes of project $project)"
  compose down -v --remove-orphans --timeout 45 >/dev/null 2>&1 || compose down -v --remove-orphans
  done_step
  if ((status == 0)); then
    say "PASSED in $(elapsed "$started" | tr -d ' ') s"
  else
    say "FAILED after $(elapsed "$started" | tr -d ' ') s"
  fi
  rm -rf "$work"
  exit "$status"
}

say "$("${compose_cmd[@]}" version --short 2>/dev/null || "${compose_cmd[@]}" version | head -1) \
on engine $(docker version --format '{{.Server.Version}}'), project $project, API on $base"
# A stack left over by an interrupted run goes first.
compose down -v --remove-orphans >/dev/null 2>&1 || true
trap finish EXIT

step "build the image (one build, used by migrate, api, worker and rpc-echo)"
compose build >"$work/build.log" 2>&1 || { tail -40 "$work/build.log" >&2; die "the image did not build"; }
done_step "$(compose config | awk '/^ *image: *orders-api/ {print $2; exit}')"

step "up -d: postgres, redis, rabbitmq, then the migration job, then api, worker, rpc-echo"
compose up -d >"$work/up.log" 2>&1 || { cat "$work/up.log" >&2; die "compose up failed"; }
done_step

container_state() { # service -> "status health exit-code"
  local id
  id=$(compose ps -q "$1" 2>/dev/null | head -1)
  [[ -n $id ]] || { echo "missing - -"; return; }
  docker inspect -f '{{.State.Status}} {{if .State.Health}}{{.State.Health.Status}}{{else}}-{{end}} {{.State.ExitCode}}' "$id"
}

step "wait until api and worker are healthy (their /readyz) and rpc-echo runs"
read -r status _ code <<<"$(container_state migrate)"
[[ $status == exited && $code == 0 ]] || die "the migration job did not complete: $status, exit code $code"
deadline=$((SECONDS + 180))
while :; do
  ready=1
  for service in api worker rpc-echo; do
    read -r status health code <<<"$(container_state "$service")"
    case "$status/$health" in
      running/healthy) ;;
      running/-) [[ $service == rpc-echo ]] || die "$service has no healthcheck" ;;
      running/starting) ready=0 ;;
      *) die "$service is $status/$health (exit code $code)" ;;
    esac
  done
  ((ready)) && break
  ((SECONDS < deadline)) || die "api and worker not healthy within 180 s"
  sleep 1
done
done_step "migrate exited 0; api healthy; worker healthy; rpc-echo running"

# http METHOD PATH [JSON BODY] [BEARER TOKEN]: sets $code and $body.
http() {
  local args=(-sS -o "$work/body" -w '%{http_code}' -X "$1" "$base$2" -H 'Accept: application/json')
  [[ -n ${3:-} ]] && args+=(-H 'Content-Type: application/json' --data "$3")
  [[ -n ${4:-} ]] && args+=(-H "Authorization: Bearer $4")
  code=$(curl "${args[@]}") || die "$1 $2: no answer"
  body=$(cat "$work/body")
}
expect() { [[ $code == "$1" ]] || die "$2: HTTP $code, expected $1: $body"; }
fields() { # fields of the last JSON body by dotted path, one a line (JSON text unless a string)
  python3 -c 'import json, sys
body = json.load(sys.stdin)
for path in sys.argv[1:]:
    value = body
    for key in path.split("."):
        value = value[key]
    print(value if isinstance(value, str) else json.dumps(value))' "$@" <<<"$body"
}

email="compose-test-$(date +%s)-$RANDOM@example.com"
password="compose-test-$RANDOM-$RANDOM"

step "POST /v1/auth/register $email"
http POST /v1/auth/register "{\"email\": \"$email\", \"password\": \"$password\", \"name\": \"Compose Test\"}"
expect 201 "register"
user_id=$(fields id)
done_step "201, user $user_id"

step "POST /v1/auth/login"
http POST /v1/auth/login "{\"email\": \"$email\", \"password\": \"$password\"}"
expect 200 "login"
token=$(fields access_token)
done_step "200, bearer token received"

step "POST /v1/orders (2 x SKU-COMPOSE-1 at 1250)"
http POST /v1/orders '{"currency": "EUR", "items": [{"sku": "SKU-COMPOSE-1", "quantity": 2, "unit_price": 1250}]}' "$token"
expect 201 "place an order"
{ read -r order_id; read -r total; } < <(fields id total_amount)
[[ $total == 2500 ]] || die "order total $total, expected 2500"
done_step "201, order $order_id, total $total"

step "read the order's event from the events queue (a consumer run in the stack's network)"
event=$(compose run --rm --no-deps -T api python -c "$(cat scripts/compose_read_event.py)" \
  "$order_id" 60 2>"$work/event.err") || {
  cat "$work/event.err" >&2
  die "the order's event did not reach the events queue as promised: ${event:-no event}"
}
done_step "$event"

step "GET /v1/redirect/echo/compose/test?probe=1 (answered by rpc-echo over RabbitMQ)"
http GET '/v1/redirect/echo/compose/test?probe=1' '' "$token"
expect 200 "redirect to rpc-echo"
{ read -r method; read -r path; read -r seen_user; read -r probe; } < <(fields method path user.id query.probe)
[[ $path == /compose/test ]] || die "rpc-echo saw path $path, expected /compose/test"
[[ $seen_user == "$user_id" ]] || die "rpc-echo saw user $seen_user, expected $user_id"
[[ $probe == '["1"]' ]] || die "rpc-echo saw query probe=$probe, expected [\"1\"]"
done_step "200, rpc-echo saw $method $path?probe=1 for user $seen_user"
