"""The token-bucket script: one round trip decides a request and can read a cache entry.

KEYS[1]  the bucket (a hash {tokens, ts}); one key per (policy, identity).
KEYS[2…] optional: keys to read when the request is allowed (the viewer's cache
         generation and entry), saving the cache its own round trip. They carry the
         bucket's hash tag (`keys.py`), so the script touches one cluster slot.
ARGV[1]  quota: the bucket's capacity.
ARGV[2]  window in seconds: an empty bucket is full again after this long.
ARGV[3]  cost: 1 to spend a token, 0 to only look (`GET /v1/rate-limits`).

Returns {allowed (0|1), remaining, reset, retry_after, {values of KEYS[2…]}}:
remaining is whole tokens left, reset the whole seconds until the bucket is full
again (rounded up), retry_after the whole seconds until one token is back (0 when
allowed). Values are read only when allowed, so a refused request reads nothing.

Invariants: the clock is Redis `TIME`, never the caller's, so every worker and
replica agrees; a bucket that would be full again simply expires (`PEXPIRE`),
so idle identities cost no memory; a look (cost 0) never writes.
"""

from __future__ import annotations

TOKEN_BUCKET = """
local quota = tonumber(ARGV[1])
local window = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])
local rate = quota / window

local clock = redis.call('TIME')
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1000000

local state = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens = tonumber(state[1])
local ts = tonumber(state[2])
if tokens == nil or ts == nil then
    tokens = quota
else
    tokens = math.min(quota, tokens + math.max(0, now - ts) * rate)
end

local allowed = 0
if tokens >= cost then
    allowed = 1
    tokens = tokens - cost
end

local missing = quota - tokens
local reset = math.ceil(missing / rate)
local retry_after = 0
if allowed == 0 then
    retry_after = math.ceil((cost - tokens) / rate)
end

if cost > 0 and allowed == 1 then
    redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'ts', tostring(now))
    redis.call('PEXPIRE', KEYS[1], math.max(1, math.ceil(missing / rate * 1000)))
end

local values = {}
if allowed == 1 and #KEYS >= 2 then
    values = redis.call('MGET', unpack(KEYS, 2))
end
return {allowed, math.floor(tokens), reset, retry_after, values}
"""

# Called after a committed write, once per generation the write makes stale (the
# owner's, the order's, the admins'): one key, so one slot, per call.
# KEYS[1]: the generation counter. ARGV[1]: its lifetime in seconds. ARGV[2]: a random
# start (from the caller: script PRNGs are seeded alike) for a missing counter, so an
# entry cached under an expired counter never matches by accident.
BUMP_GENERATION = """
if redis.call('EXISTS', KEYS[1]) == 1 then
    redis.call('INCR', KEYS[1])
else
    redis.call('SET', KEYS[1], ARGV[2])
end
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[1]))
return 1
"""
