-- Shared by every bench script (loaded with dofile from BENCH_WRK_DIR).
--
-- Environment it reads (set by bench/wrk_runner.py):
--   BENCH_TOKEN    bearer token sent as `Authorization` (optional)
--   BENCH_HEADERS  extra headers, one `Name: value` a line (optional)
-- It gives every wrk thread a number (`thread_id`, set before `init`) and prints
-- one `BENCH_JSON {...}` line from `done()`: requests, duration, error counts and
-- latency percentiles in microseconds (the histogram `--latency` prints, read here so
-- the runner never parses wrk's prose). A script may set `bench.extra` to a function
-- returning a JSON value for the line's "extra" field (it can read `bench.threads`).

bench = {threads = {}}

function bench.read_file(path)
   local file = assert(io.open(path, "rb"), "cannot open " .. tostring(path))
   local content = file:read("*a")
   file:close()
   return content
end

function bench.read_lines(path)
   local lines = {}
   if path == nil or path == "" then
      return lines
   end
   for line in io.lines(path) do
      if line ~= "" then
         lines[#lines + 1] = line
      end
   end
   return lines
end

local token = os.getenv("BENCH_TOKEN")
if token ~= nil and token ~= "" then
   wrk.headers["Authorization"] = "Bearer " .. token
end
for line in (os.getenv("BENCH_HEADERS") or ""):gmatch("[^\n]+") do
   local name, value = line:match("^([^:]+):%s*(.*)$")
   if name ~= nil then
      wrk.headers[name] = value
   end
end

local threads_started = 0

function setup(thread)
   thread:set("thread_id", threads_started)
   threads_started = threads_started + 1
   bench.threads[#bench.threads + 1] = thread
end

function done(summary, latency, requests)
   local errors = summary.errors
   io.write(string.format(
      'BENCH_JSON {"requests":%d,"duration_us":%d,"bytes":%d,'
         .. '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},'
         .. '"latency_us":{"p50":%d,"p75":%d,"p90":%d,"p99":%d,"p99.9":%d,'
         .. '"mean":%.1f,"max":%d},"extra":%s}\n',
      summary.requests, summary.duration, summary.bytes,
      errors.connect, errors.read, errors.write, errors.status, errors.timeout,
      latency:percentile(50), latency:percentile(75), latency:percentile(90),
      latency:percentile(99), latency:percentile(99.9), latency.mean, latency.max,
      bench.extra and bench.extra() or "null"
   ))
end
