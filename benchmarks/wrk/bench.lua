-- wrk script for every benchmark endpoint: wrk ... -s bench.lua URL -- MODE MAX
--   MODE: users | combo | cache | items | ping | mix (all four, in turn)
--   MAX:  requests per thread after which the thread stops (0: no limit)
-- done() prints one line "WRK_JSON {...}" that benchmarks/runner.py parses.

local threads = {}
local counter = 0

function setup(thread)
  thread:set("id", #threads + 1)
  table.insert(threads, thread)
end

local mode = "users"
local max_requests = 0
local json_headers = { ["Content-Type"] = "application/json" }

function init(args)
  mode = args[1] or "users"
  max_requests = tonumber(args[2] or "0")
  math.randomseed(os.time() * 1000 + (id or 0))
end

local function users()
  return wrk.format("GET", "/users/" .. math.random(1, 10000))
end

local function combo()
  return wrk.format("GET", "/combo")
end

local function cache()
  return wrk.format("POST", "/cache/k" .. math.random(1, 1000) .. "?value=v" .. counter)
end

local function items()
  return wrk.format("POST", "/items", json_headers, '{"name":"item ' .. counter .. '"}')
end

local function ping()
  return wrk.format("GET", "/ping")
end

local mix = { users, combo, cache, items }

function request()
  counter = counter + 1
  if max_requests > 0 and counter > max_requests then
    wrk.thread:stop()
  end
  if mode == "users" then return users()
  elseif mode == "combo" then return combo()
  elseif mode == "cache" then return cache()
  elseif mode == "items" then return items()
  elseif mode == "ping" then return ping()
  else return mix[(counter % 4) + 1]() end
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRK_JSON {"requests":%d,"duration_us":%d,"bytes":%d,"non2xx":%d,"connect_errors":%d,' ..
    '"read_errors":%d,"write_errors":%d,"timeouts":%d,"p50_us":%d,"p90_us":%d,' ..
    '"p99_us":%d,"mean_us":%.1f,"max_us":%d}\n',
    summary.requests, summary.duration, summary.bytes, e.status, e.connect, e.read, e.write,
    e.timeout, latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency.mean, latency.max))
end
