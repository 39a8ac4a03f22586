-- wrk script: replay pre-signed deliveries (lines "<header>\t<body>"), each thread its share.
-- Usage: wrk -s bench/replay.lua URL -- <deliveries file> <threads>
local requests = {}
local count = 0
local position = 0
local next_id = 1

function setup(thread)
  thread:set("id", next_id)
  next_id = next_id + 1
end

function init(args)
  local threads = tonumber(args[2])
  local line_number = 0
  for line in io.lines(args[1]) do
    if line_number % threads == id - 1 then
      local tab = string.find(line, "\t", 1, true)
      local headers = {
        ["HTTP-HRFLOW-SIGNATURE"] = string.sub(line, 1, tab - 1),
        ["Content-Type"] = "application/json",
      }
      count = count + 1
      requests[count] = wrk.format("POST", "/webhook", headers, string.sub(line, tab + 1))
    end
    line_number = line_number + 1
  end
end

function request()
  position = position % count + 1
  return requests[position]
end
