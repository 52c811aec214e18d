-- Reports usage without changing anything.
-- KEYS[1]: the caller's hash-tagged prefix, which routes the call in a cluster (every key below
-- carries its tag). ARGV: that prefix, scope count, then per scope: subject, window count, window ms per window.
-- Returns (subject, window ms, used, reset ms) per window, then 'in_flight', then
-- (subject, count) per scope.
local p = ARGV[1]
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local out, flights, i = {}, {}, 3
for s = 1, tonumber(ARGV[2]) do
  local subject, nw = ARGV[i], tonumber(ARGV[i + 1])
  for w = 1, nw do
    local ms = tonumber(ARGV[i + 1 + w])
    local key = p .. 'w:' .. subject .. ':' .. ms
    local live = redis.call('ZRANGEBYSCORE', key, '(' .. (now - ms), '+inf', 'WITHSCORES', 'LIMIT', 0, 1)
    local reset = 0
    if live[2] then reset = tonumber(live[2]) + ms - now end
    local n = #out
    out[n + 1], out[n + 2] = subject, ms
    out[n + 3], out[n + 4] = redis.call('ZCOUNT', key, '(' .. (now - ms), '+inf'), reset
  end
  local n = #flights
  flights[n + 1], flights[n + 2] = subject, redis.call('ZCOUNT', p .. 'f:' .. subject, '(' .. now, '+inf')
  i = i + 2 + nw
end
out[#out + 1] = 'in_flight'
for _, v in ipairs(flights) do out[#out + 1] = v end
return out
