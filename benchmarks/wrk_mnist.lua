-- wrk script: POST real MNIST PNGs as multipart `image_file` uploads, rotating over prepared
-- bodies, and check every answer against the label carried in the echoed file name
-- (`<index>_<label>.png`). Usage (benchmarks/http_load.py runs it):
--   wrk -s benchmarks/wrk_mnist.lua URL -- BODY_DIR
-- BODY_DIR holds `count` (number of bodies), `boundary` and `0.bin` … `<count-1>.bin`.

local threads = {}
local thread_number = 0

function setup(thread)
  thread:set("offset", thread_number * 7919)
  thread_number = thread_number + 1
  table.insert(threads, thread)
end

local function read_file(path)
  local handle = assert(io.open(path, "rb"))
  local data = handle:read("*a")
  handle:close()
  return data
end

function init(args)
  local dir = args[1]
  local count = tonumber(read_file(dir .. "/count"))
  local boundary = read_file(dir .. "/boundary")
  local headers = { ["Content-Type"] = "multipart/form-data; boundary=" .. boundary }
  requests = {}
  for i = 0, count - 1 do
    requests[i + 1] = wrk.format("POST", wrk.path, headers, read_file(dir .. "/" .. i .. ".bin"))
  end
  next_index = offset % count
  answers, correct, bad_status, unparsed = 0, 0, 0, 0
end

function request()
  next_index = next_index % #requests + 1
  return requests[next_index]
end

local PATTERN = '"image_filename"%s*:%s*"%d+_(%d)%.png"%s*,%s*"prediction"%s*:%s*"(%d)"'

function response(status, headers, body)
  if status ~= 200 then
    bad_status = bad_status + 1
    return
  end
  local found = 0
  for label, prediction in string.gmatch(body, PATTERN) do
    found = found + 1
    if label == prediction then
      correct = correct + 1
    end
  end
  if found == 0 then
    unparsed = unparsed + 1
  end
  answers = answers + found
end

function done(summary, latency, requests)
  local totals = { answers = 0, correct = 0, bad_status = 0, unparsed = 0 }
  for _, thread in ipairs(threads) do
    for key, _ in pairs(totals) do
      totals[key] = totals[key] + thread:get(key)
    end
  end
  local e = summary.errors
  io.write(string.format(
    'WRK_JSON {"requests":%d,"duration_us":%d,"answers":%d,"correct":%d,"bad_status":%d,'
      .. '"unparsed":%d,"socket_errors":%d,"timeouts":%d,"p50_us":%d,"p90_us":%d,"p99_us":%d,'
      .. '"max_us":%d,"mean_us":%.1f}\n',
    summary.requests, summary.duration, totals.answers, totals.correct, totals.bad_status,
    totals.unparsed, e.connect + e.read + e.write, e.timeout, latency:percentile(50),
    latency:percentile(90), latency:percentile(99), latency.max, latency.mean))
end
