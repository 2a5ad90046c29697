-- wrk script of the serving benchmark (bench/serve.py): POST /rank bodies from a file, rotated.
--
--   wrk -t1 -c8 -d15s --timeout 10s -s bench/wrk/rank.lua http://127.0.0.1:8000 -- bodies.jsonl [offset]
--
-- The file holds one JSON request body per line (different users, Zipf-drawn candidates); each
-- request takes the next line, wrapping around ([offset] = first line, 0-based). Counts answers by
-- HTTP status, 200 bodies that say "degraded":true, and shed answers (429, or an "overloaded" 503 of
-- older services, with a Retry-After header: an overloaded service's refusals). done() prints one line
--   MTRANK_WRK_JSON {...}
-- with requests, duration, bytes, socket errors, statuses, degraded, shed and latency percentiles in us
-- (wrk's own histogram: the time from sending a request to its complete response).

local bodies = {}
local n = 0
local i = 0
statuses = {}   -- globals: done() reads them from each thread with thread:get()
degraded = 0
shed = 0

local threads = {}

function setup(thread)
  table.insert(threads, thread)
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
  i = (tonumber(args[2] or "0") or 0) % n
  wrk.method = "POST"
  wrk.headers["Content-Type"] = "application/json"
end

function request()
  i = i % n + 1
  return wrk.format("POST", "/rank", nil, bodies[i])
end

function response(status, headers, body)
  statuses[status] = (statuses[status] or 0) + 1
  if status == 200 and body ~= nil and string.find(body, '"degraded":true', 1, true) then
    degraded = degraded + 1
  elseif status == 429 or (status == 503 and body ~= nil and string.find(body, "overloaded", 1, true)) then
    -- every 503 carries Retry-After (not ready, Redis down in fail mode): only an overloaded one is shed
    for name, _ in pairs(headers) do
      if string.lower(name) == "retry-after" then
        shed = shed + 1
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
  local st, deg, sh = {}, 0, 0
  for _, t in ipairs(threads) do
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
    '"latency_us": {"min": %s, "mean": %s, "stdev": %s, "max": %s, "percentiles": {%s}}}\n',
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    table.concat(parts, ", "), deg, sh,
    num(latency.min), num(latency.mean), num(latency.stdev), num(latency.max), table.concat(pct, ", ")))
end
