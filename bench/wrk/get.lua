-- GET one path (the URL's) or rotate over the paths in BENCH_PATHS_FILE.
--
-- With a paths file every thread starts at its own offset and walks the list,
-- so consecutive requests ask for different resources (cache-cold reads).
dofile(os.getenv("BENCH_WRK_DIR") .. "/common.lua")

local paths = bench.read_lines(os.getenv("BENCH_PATHS_FILE"))

if #paths > 0 then
   local index = 0

   function init(args)
      index = ((thread_id or 0) * 7919) % #paths
   end

   function request()
      index = index % #paths + 1
      return wrk.format(nil, paths[index])
   end
end
