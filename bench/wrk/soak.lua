-- The soak's mixed traffic (bench/soak.py): reads, creates and cancels, paced.
--
-- Environment, besides common.lua's (the URL is the service's root):
--   BENCH_TOKENS_FILE  the soak's users, `user_id token` a line
--   BENCH_PATHS_FILE   their seeded orders, one `/v1/orders/{id}` a line, round robin over
--                      the users (line k belongs to user (k - 1) % #users + 1)
--   BENCH_BODY_FILE    the order to POST; its metadata holds "soak":"keep", which the
--                      orders meant to be cancelled get as "soak":"cancel"
--   BENCH_DELAY_MS     mean think time of a connection after each answer (unset or 0:
--                      no pause, as fast as the service answers)
-- Of every 20 requests: 12 reads of a hot set (two orders a user: cache hits until the
-- user writes), 3 uncached reads (`Cache-Control: no-cache`) rotating over all seeded
-- orders, 2 list pages, a create kept (bench/soak.py sends its status messages), a create
-- to cancel, and a cancel of one of those (a hot read while none waits). Requests go to
-- the users in turn, each with its own token.
dofile(os.getenv("BENCH_WRK_DIR") .. "/common.lua")

local PATTERN = {
   "hot", "hot", "uncached", "hot", "keep", "hot", "list", "hot", "hot", "doomed",
   "hot", "uncached", "hot", "hot", "cancel", "hot", "list", "hot", "uncached", "hot",
}

local users, user_index = {}, {}
for _, line in ipairs(bench.read_lines(os.getenv("BENCH_TOKENS_FILE"))) do
   local id, token = line:match("^(%S+) (%S+)$")
   users[#users + 1] = "Bearer " .. token
   user_index[id] = #users
end
local paths = bench.read_lines(os.getenv("BENCH_PATHS_FILE"))
local hot = math.min(2 * #users, #paths)
local keep_body = bench.read_file(os.getenv("BENCH_BODY_FILE"))
local doomed_body = keep_body:gsub('"soak":"keep"', '"soak":"cancel"')
local run_id = os.getenv("BENCH_RUN_ID") or tostring(os.time())
local delay_ms = tonumber(os.getenv("BENCH_DELAY_MS") or "") or 0

local function with(extra)
   local headers = {}
   for name, value in pairs(wrk.headers) do
      headers[name] = value
   end
   for name, value in pairs(extra) do
      headers[name] = value
   end
   return headers
end

local plain = with({})
local no_cache = with({["Cache-Control"] = "no-cache"})
local posting = with({["Content-Type"] = "application/json"})

-- Per thread (each has its own Lua state); read back by `bench.extra`.
sent = {hot = 0, uncached = 0, list = 0, keep = 0, doomed = 0, cancel = 0}
local counter, cursor = 0, 0
-- Orders to cancel, first in first out: {id, user} pairs.
local doomed, first, last = {}, 1, 0

function init(args)
   cursor = ((thread_id or 0) * 7919) % #paths
   math.randomseed(os.time() + (thread_id or 0))
end

local function get(path, line, headers)
   headers["Authorization"] = users[(line - 1) % #users + 1]
   return wrk.format("GET", path, headers)
end

local function post(body)
   posting["Authorization"] = users[counter % #users + 1]
   posting["Idempotency-Key"] = run_id .. "-" .. (thread_id or 0) .. "-" .. counter
   return wrk.format("POST", "/v1/orders", posting, body)
end

function request()
   counter = counter + 1
   local kind = PATTERN[(counter - 1) % #PATTERN + 1]
   if kind == "cancel" and first > last then
      kind = "hot"
   end
   sent[kind] = sent[kind] + 1
   if kind == "hot" then
      local line = counter % hot + 1
      return get(paths[line], line, plain)
   elseif kind == "uncached" then
      cursor = cursor % #paths + 1
      return get(paths[cursor], cursor, no_cache)
   elseif kind == "list" then
      return get("/v1/orders?limit=20", counter, plain)
   elseif kind == "keep" then
      return post(keep_body)
   elseif kind == "doomed" then
      return post(doomed_body)
   end
   local order = doomed[first]
   doomed[first] = nil
   first = first + 1
   plain["Authorization"] = users[order[2]]
   return wrk.format("POST", "/v1/orders/" .. order[1] .. "/cancel", plain, "")
end

function response(status, headers, body)
   if status == 201 and body:find('"soak":"cancel"', 1, true) then
      local id = body:match('"id":"([0-9a-f-]+)"')
      local owner = user_index[body:match('"user_id":"([0-9a-f-]+)"')]
      if id and owner then
         last = last + 1
         doomed[last] = {id, owner}
      end
   end
end

if delay_ms > 0 then
   -- Uniform around the mean, so connections do not fall into step.
   function delay()
      return math.floor(delay_ms * (0.5 + math.random()))
   end
end

function bench.extra()
   local totals = {}
   for _, thread in ipairs(bench.threads) do
      for kind, count in pairs(thread:get("sent")) do
         totals[kind] = (totals[kind] or 0) + count
      end
   end
   local fields = {}
   for kind, count in pairs(totals) do
      fields[#fields + 1] = string.format('"%s":%d', kind, count)
   end
   return "{" .. table.concat(fields, ",") .. "}"
end
