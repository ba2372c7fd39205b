#!/usr/bin/env bash
# A first session with orders-api, top to bottom: register, log in, place an order with
# an Idempotency-Key and replay it, list, read with a 304, cancel, make an admin with the
# CLI, move an order on with the right If-Match, and read the rate-limit fields.
#
#   make run                    # terminal 1 (prints the URLs once ready)
#   examples/quickstart.sh      # terminal 2, from the repository root
#
# Needs curl and jq. API (default http://127.0.0.1:8000) points it elsewhere; the admin
# step runs the operator CLI with the same POSTGRES_* settings as the service. Every step
# checks its status code, so the script stops at the first surprise. `make test` runs it
# against a live server (tests/test_first_hour.py).
set -euo pipefail

API=${API:-http://127.0.0.1:8000}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
RUN=$(date +%s)-$RANDOM # a fresh user and key on every run
EMAIL="ada-$RUN@example.com"
ADMIN_EMAIL="ops-$RUN@example.com"
PASSWORD="correct horse battery staple"
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT

# call METHOD PATH [curl options…]: the status in $STATUS, the body in $BODY, headers in a file.
call() {
  local method=$1 path=$2
  shift 2
  STATUS=$(curl -sS -X "$method" "$API$path" -D "$TMP/headers" -o "$TMP/body" -w '%{http_code}' "$@")
  BODY=$(cat "$TMP/body")
}
header() { grep -i "^$1:" "$TMP/headers" | head -n 1 | cut -d ' ' -f 2- | tr -d '\r'; }
expect() {
  if [[ $STATUS != "$1" ]]; then
    echo "expected HTTP $1, got $STATUS: $BODY" >&2
    exit 1
  fi
}
step() { printf '\n== %s\n' "$*"; }

step "Register $EMAIL"
call POST /v1/auth/register -H 'Content-Type: application/json' \
  -d "{\"email\": \"$EMAIL\", \"password\": \"$PASSWORD\", \"name\": \"Ada\"}"
expect 201
jq -c '{id, email, role}' <<<"$BODY"

step "Log in"
call POST /v1/auth/login -H 'Content-Type: application/json' \
  -d "{\"email\": \"$EMAIL\", \"password\": \"$PASSWORD\"}"
expect 200
TOKEN=$(jq -r .access_token <<<"$BODY")
AUTH="Authorization: Bearer $TOKEN"
jq -c '{token_type, expires_in}' <<<"$BODY"

step "Place an order with an Idempotency-Key"
KEY="checkout-$RUN"
ORDER='{"currency": "EUR", "items": [{"sku": "MUG-CERAMIC-350", "name": "Ceramic mug, 350 ml", "quantity": 2, "unit_price": 1250}], "metadata": {"channel": "web"}}'
call POST /v1/orders -H "$AUTH" -H 'Content-Type: application/json' -H "Idempotency-Key: $KEY" \
  -d "$ORDER"
expect 201
ID=$(jq -r .id <<<"$BODY")
echo "HTTP $STATUS  Location: $(header location)  ETag: $(header etag)"
jq -c '{id, status, total_amount, currency, version}' <<<"$BODY"

step "Send it again with the same key: the first response, no second order"
call POST /v1/orders -H "$AUTH" -H 'Content-Type: application/json' -H "Idempotency-Key: $KEY" \
  -d "$ORDER"
expect 201
[[ $(jq -r .id <<<"$BODY") == "$ID" ]] || { echo "the replay created another order" >&2; exit 1; }
echo "HTTP $STATUS  Idempotent-Replayed: $(header idempotent-replayed)  id: $ID"

step "List my orders (newest first)"
call GET "/v1/orders?limit=10" -H "$AUTH"
expect 200
jq -c '{ids: [.items[].id], next_cursor}' <<<"$BODY"

step "Read it, then read again only if it changed"
call GET "/v1/orders/$ID" -H "$AUTH"
expect 200
ETAG=$(header etag)
echo "HTTP $STATUS  ETag: $ETAG  X-Cache: $(header x-cache)"
call GET "/v1/orders/$ID" -H "$AUTH" -H "If-None-Match: $ETAG"
expect 304
echo "HTTP $STATUS Not Modified"

step "Cancel it; cancelling again is an invalid transition"
call POST "/v1/orders/$ID/cancel" -H "$AUTH"
expect 200
jq -c '{status, version}' <<<"$BODY"
call POST "/v1/orders/$ID/cancel" -H "$AUTH"
expect 409
jq -c '{status, type}' <<<"$BODY"

step "Make an admin with the operator CLI"
call POST /v1/auth/register -H 'Content-Type: application/json' \
  -d "{\"email\": \"$ADMIN_EMAIL\", \"password\": \"$PASSWORD\"}"
expect 201
(cd "$ROOT" && "${PYTHON:-.venv/bin/python}" -m api.cli promote-admin "$ADMIN_EMAIL")
call POST /v1/auth/login -H 'Content-Type: application/json' \
  -d "{\"email\": \"$ADMIN_EMAIL\", \"password\": \"$PASSWORD\"}"
expect 200
ADMIN_TOKEN=$(jq -r .access_token <<<"$BODY")

step "Admin: mark a new order paid, guarded by its ETag"
call POST /v1/orders -H "$AUTH" -H 'Content-Type: application/json' -d "$ORDER"
expect 201
ID2=$(jq -r .id <<<"$BODY")
ETAG2=$(header etag)
call PATCH "/v1/orders/$ID2" -H "Authorization: Bearer $ADMIN_TOKEN" \
  -H 'Content-Type: application/json' -H "If-Match: $ETAG2" -d '{"status": "paid"}'
expect 200
echo "HTTP $STATUS  ETag: $(header etag)"
jq -c '{status, version}' <<<"$BODY"
call PATCH "/v1/orders/$ID2" -H "Authorization: Bearer $ADMIN_TOKEN" \
  -H 'Content-Type: application/json' -H "If-Match: $ETAG2" -d '{"status": "shipped"}'
expect 412
echo "the same If-Match again (the order moved on):"
jq -c '{status, type}' <<<"$BODY"

step "Rate limits: every /v1 response carries them"
call GET /v1/auth/me -H "$AUTH"
expect 200
echo "RateLimit-Policy: $(header ratelimit-policy)"
echo "RateLimit: $(header ratelimit)"
call GET /v1/rate-limits -H "$AUTH"
expect 200
jq -c '.policies[]' <<<"$BODY"

printf '\nDone: every step answered as documented.\n'
