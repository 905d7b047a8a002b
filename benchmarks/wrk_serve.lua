-- wrk script of benchmarks/bench_serve.py: open-loop fixed-rate load on one route.
--
-- bench_serve.py runs `wrk -t1 -cN -dD -s wrk_serve.lua URL` once per phase; the
-- environment says what to send:
--   SHOPML_BENCH_PATH       the route, e.g. /v1/models/recommender:predict
--   SHOPML_BENCH_BODIES     a JSON-lines file of POST bodies, sent in turn; absent or
--                           empty: GET requests (health routes)
--   SHOPML_BENCH_RATE       requests/s for the whole run; 0 sends back to back on every
--                           connection (closed loop, the max-throughput probe)
--
-- Open loop: every send takes the next slot of one schedule (a request every 1/rate s)
-- shared by all connections, so the offered rate does not follow the server's speed
-- and requests do not fall into step with each other. A send that finds its slot
-- already past (every connection was busy) goes at once and is counted as late: many
-- late sends mean the phase needs more connections. Latency is wrk's own, from the
-- first byte written to the last byte read, in microseconds.
-- The last line printed is a JSON object with the figures.

local ffi = require("ffi")
ffi.cdef [[
typedef struct { long tv_sec; long tv_nsec; } shopml_timespec;
int clock_gettime(int clk_id, shopml_timespec *tp);
]]
local CLOCK_MONOTONIC = 1
local now_ts = ffi.new("shopml_timespec")

local function now_ms()
  ffi.C.clock_gettime(CLOCK_MONOTONIC, now_ts)
  return tonumber(now_ts.tv_sec) * 1000 + tonumber(now_ts.tv_nsec) / 1e6
end

local path = os.getenv("SHOPML_BENCH_PATH") or "/v2/health/ready"
local rate = tonumber(os.getenv("SHOPML_BENCH_RATE") or "0")
local bodies_file = os.getenv("SHOPML_BENCH_BODIES") or ""

local bodies = {}
if bodies_file ~= "" then
  for line in io.lines(bodies_file) do
    if #line > 0 then bodies[#bodies + 1] = line end
  end
end

-- Per-thread state (wrk runs this file once per thread; bench_serve uses one thread).
late = 0
codes = {}
local next_slot = nil
local sent = math.random(0, 1000)

if rate > 0 then
  local period_ms = 1000 / rate
  function delay()
    local now = now_ms()
    next_slot = (next_slot or now) + period_ms
    local wait = next_slot - now
    if wait < 0 then
      late = late + 1
      return 0
    end
    return math.floor(wait + 0.5)
  end
end

function request()
  if #bodies == 0 then return wrk.format("GET", path) end
  sent = sent + 1
  local headers = { ["Content-Type"] = "application/json" }
  return wrk.format("POST", path, headers, bodies[(sent % #bodies) + 1])
end

function response(status, headers, body)
  local key = tostring(status)
  codes[key] = (codes[key] or 0) + 1
end

local threads = {}

function setup(thread)
  table.insert(threads, thread)
end

function done(summary, latency, requests)
  local all_codes, late_total = {}, 0
  for _, thread in ipairs(threads) do
    late_total = late_total + (thread:get("late") or 0)
    for code, count in pairs(thread:get("codes") or {}) do
      all_codes[code] = (all_codes[code] or 0) + count
    end
  end
  local parts = {}
  for code, count in pairs(all_codes) do
    parts[#parts + 1] = string.format('"%s": %d', code, count)
  end
  local errors = summary.errors
  io.write(string.format(
    '{"requests": %d, "duration_s": %.6f, "p50_ms": %.4f, "p99_ms": %.4f, '
      .. '"max_ms": %.4f, "codes": {%s}, "socket_errors": %d, "late_sends": %d}\n',
    summary.requests, summary.duration / 1e6, latency:percentile(50) / 1000,
    latency:percentile(99) / 1000, latency.max / 1000, table.concat(parts, ", "),
    errors.connect + errors.read + errors.write + errors.timeout, late_total
  ))
end
