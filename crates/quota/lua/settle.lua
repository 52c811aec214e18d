-- Settles a charge exactly once: the first call moves it from 'charged' to 'committed' or
-- 'refunded' (returning the window charges and freeing the idempotency key); later calls change
-- nothing. Every call releases the in-flight slot.
-- KEYS[1]: the caller's hash-tagged prefix, which routes the call in a cluster (every key below
-- carries its tag). ARGV: that prefix, charge id, 'commit' | 'refund', idempotency key ('' for none), scope count, then
-- per scope: subject, window count, window ms per window. Returns 1 when this call settled it.
local p, cid, outcome, idem = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local ckey = p .. 'c:' .. cid
local first = redis.call('GET', ckey) == 'charged'
local i = 6
for s = 1, tonumber(ARGV[5]) do
  local subject, nw = ARGV[i], tonumber(ARGV[i + 1])
  redis.call('ZREM', p .. 'f:' .. subject, cid)
  if first and outcome == 'refund' then
    for w = 1, nw do redis.call('ZREM', p .. 'w:' .. subject .. ':' .. ARGV[i + 1 + w], cid) end
  end
  i = i + 2 + nw
end
if not first then return 0 end
if outcome == 'refund' then
  redis.call('SET', ckey, 'refunded', 'KEEPTTL')
  if idem ~= '' and redis.call('GET', p .. 'i:' .. idem) == cid then
    redis.call('DEL', p .. 'i:' .. idem)
  end
else
  redis.call('SET', ckey, 'committed', 'KEEPTTL')
end
return 1
