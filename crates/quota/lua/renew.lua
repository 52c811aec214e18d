-- Extends a running charge's in-flight lease in every scope that caps requests in flight.
-- KEYS[1]: the caller's hash-tagged prefix, which routes the call in a cluster (every key below
-- carries its tag). ARGV: that prefix, charge id, lease ms, subjects...
local p, cid, lease = ARGV[1], ARGV[2], tonumber(ARGV[3])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
for i = 4, #ARGV do
  local key = p .. 'f:' .. ARGV[i]
  if redis.call('ZADD', key, 'XX', 'CH', now + lease, cid) == 1 then
    redis.call('PEXPIRE', key, lease)
  end
end
return 1
