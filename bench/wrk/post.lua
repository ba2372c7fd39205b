-- POST the JSON body in BENCH_BODY_FILE with a fresh `Idempotency-Key` on every request.
--
-- The key is BENCH_RUN_ID (new for every wrk run), the thread number and a per-thread
-- counter, so no request of the whole bench is ever an idempotent replay.
dofile(os.getenv("BENCH_WRK_DIR") .. "/common.lua")

wrk.method = "POST"
wrk.body = bench.read_file(os.getenv("BENCH_BODY_FILE"))
wrk.headers["Content-Type"] = "application/json"

local run_id = os.getenv("BENCH_RUN_ID") or tostring(os.time())
local counter = 0

function request()
   counter = counter + 1
   wrk.headers["Idempotency-Key"] = run_id .. "-" .. (thread_id or 0) .. "-" .. counter
   return wrk.format()
end
