-- wrk script of the serving benchmark (bench/serve.py): POST /rank bodies from a file, rotated.
--
--   wrk -t1 -c8 -d15s --timeout 10s -s bench/wrk/rank.lua http://127.0.0.1:8000 -- bodies.jsonl [offset] [mode]
--
-- The file holds one JSON request body per line (different users, Zipf-drawn candidates); each
-- request takes the next line, wrapping around ([offset] = first line, 0-based). Counts answers by
-- HTTP status, 200 bodies that say "degraded":true, and shed answers (429, or an "overloaded" 503 of
-- older services, with a Retry-After header: an overloaded service's refusals). done() prints one line
--   MTRANK_WRK_JSON {...}
-- with requests, duration, bytes, socket errors, statuses, degraded, shed and latency percentiles in us
-- (wrk's own histogram: the time from sending a request to its complete response).
--
-- [mode] (the overload run; needs one connection per thread, -tC -cC, so that a thread's last
-- request is its connection's): "retry" sends the next request at once after a refusal, "honour"
-- waits the refusal's Retry-After first; both record the latency of every 200 answer (LuaJIT
-- clock) and print them as "accepted_ms" (the latencies of accepted requests only: wrk's histogram
-- mixes in the fast refusals). Without [mode] ("plain") nothing of this happens.

local bodies = {}
local n = 0
local i = 0
statuses = {}   -- globals: done() reads them from each thread with thread:get()
degraded = 0
shed = 0

local threads = {}
local mode = "plain"
local sent_at = 0
local wait_ms = 0
accepted = {}   -- global, read by done(): latencies (ms) of the 200 answers, in "retry"/"honour" mode

local ffi = require("ffi")
ffi.cdef[[
typedef struct { long tv_sec; long tv_nsec; } mtrank_timespec;
int clock_gettime(int clk_id, mtrank_timespec *tp);
]]
local ts = ffi.new("mtrank_timespec")

local function now_ms()
  ffi.C.clock_gettime(1, ts)  -- CLOCK_MONOTONIC
  return tonumber(ts.tv_sec) * 1000 + tonumber(ts.tv_nsec) / 1e6
end

function setup(thread)
  table.insert(threads, thread)
  thread:set("thread_no", #threads - 1)
end

function init(args)
  local path = args[1]
  if path == nil then
    error("usage: wrk ... -s rank.lua URL -- bodies.jsonl [offset]")
  end
  for line in io.lines(path) do
    if #line > 0 then
      n = n + 1
      bodies[n] = line
    end
  end
  if n == 0 then
    error("no request bodies in " .. path)
  end
  mode = args[3] or "plain"
  -- each thread starts at its own line (thread_no: set by setup)
  i = ((tonumber(args[2] or "0") or 0) + 7919 * (thread_no or 0)) % n
  if mode == "honour" then
    delay = function()  -- wrk calls it before each request of this thread's one connection
      local w = wait_ms
      wait_ms = 0
      return w
    end
  end
  wrk.method = "POST"
  wrk.headers["Content-Type"] = "application/json"
end

function request()
  i = i % n + 1
  if mode ~= "plain" then
    sent_at = now_ms()
  end
  return wrk.format("POST", "/rank", nil, bodies[i])
end

function response(status, headers, body)
  statuses[status] = (statuses[status] or 0) + 1
  if status == 200 and mode ~= "plain" then
    accepted[#accepted + 1] = now_ms() - sent_at
  end
  if status == 200 and body ~= nil and string.find(body, '"degraded":true', 1, true) then
    degraded = degraded + 1
  elseif status == 429 or (status == 503 and body ~= nil and string.find(body, "overloaded", 1, true)) then
    -- every 503 carries Retry-After (not ready, Redis down in fail mode): only an overloaded one is shed
    for name, value in pairs(headers) do
      if string.lower(name) == "retry-after" then
        shed = shed + 1
        if mode == "honour" then
          wait_ms = 1000 * (tonumber(value) or 1)
        end
        break
      end
    end
  end
end

local function num(x)
  if x ~= x or x == math.huge or x == -math.huge then
    return "null"
  end
  return string.format("%.3f", x)
end

function done(summary, latency, requests)
  local st, deg, sh, acc = {}, 0, 0, {}
  for _, t in ipairs(threads) do
    local a = t:get("accepted")
    if a ~= nil then
      for _, v in ipairs(a) do
        acc[#acc + 1] = string.format("%.3f", v)
      end
    end
    local s = t:get("statuses")
    if s ~= nil then
      for k, v in pairs(s) do
        local key = tostring(k)
        st[key] = (st[key] or 0) + v
      end
    end
    deg = deg + (t:get("degraded") or 0)
    sh = sh + (t:get("shed") or 0)
  end
  local parts = {}
  for k, v in pairs(st) do
    table.insert(parts, string.format('"%s": %d', k, v))
  end
  local e = summary.errors
  local pct = {}
  for _, p in ipairs({50, 90, 99, 99.9}) do
    table.insert(pct, string.format('"%s": %s', tostring(p), num(latency:percentile(p))))
  end
  io.write(string.format(
    'MTRANK_WRK_JSON {"requests": %d, "duration_us": %d, "bytes": %d, ' ..
    '"errors": {"connect": %d, "read": %d, "write": %d, "status": %d, "timeout": %d}, ' ..
    '"statuses": {%s}, "degraded": %d, "shed": %d, ' ..
    '"latency_us": {"min": %s, "mean": %s, "stdev": %s, "max": %s, "percentiles": {%s}}, ' ..
    '"accepted_ms": [%s]}\n',
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    table.concat(parts, ", "), deg, sh,
    num(latency.min), num(latency.mean), num(latency.stdev), num(latency.max), table.concat(pct, ", "),
    table.concat(acc, ", ")))
end
