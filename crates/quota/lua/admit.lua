-- Admits one charge against every limit of every scope, or none (one EVALSHA, atomic in Redis).
-- KEYS[1]: the caller's hash-tagged prefix, which routes the call in a cluster (every key below
-- carries its tag). ARGV: that prefix, charge id, idempotency key ('' for none), lease ms, retention ms, scope count, then
-- per scope: subject, window count, (window ms, images) per window, rate interval ms (0 = none),
-- rate burst, max in flight (-1 = none).
-- Returns {'duplicate', charge id} | {'refused', subject, kind, a, b, retry ms (-1 = unknown)} |
-- {'admitted', (subject, window ms, limit, used, reset ms) per window}.
-- Time is the server's (TIME), so gateways with skewed clocks agree.
local p, cid, idem = ARGV[1], ARGV[2], ARGV[3]
local lease, keep = tonumber(ARGV[4]), tonumber(ARGV[5])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)

if idem ~= '' then
  local prev = redis.call('GET', p .. 'i:' .. idem)
  if prev then return {'duplicate', prev} end
end

local scopes, i = {}, 7
for s = 1, tonumber(ARGV[6]) do
  local sc = {subject = ARGV[i], wins = {}}
  local nw = tonumber(ARGV[i + 1])
  i = i + 2
  for w = 1, nw do
    sc.wins[w] = {ms = tonumber(ARGV[i]), limit = tonumber(ARGV[i + 1])}
    i = i + 2
  end
  sc.interval, sc.burst, sc.inflight = tonumber(ARGV[i]), tonumber(ARGV[i + 1]), tonumber(ARGV[i + 2])
  i = i + 3
  scopes[s] = sc
end

-- Check every limit before charging any; keep the refusal with the longest wait.
local worst
local function refuse(subject, kind, a, b, retry)
  if worst == nil or retry > worst[6] then worst = {'refused', subject, kind, a, b, retry} end
end
for _, sc in ipairs(scopes) do
  for _, w in ipairs(sc.wins) do
    w.key = p .. 'w:' .. sc.subject .. ':' .. w.ms
    redis.call('ZREMRANGEBYSCORE', w.key, '-inf', now - w.ms)
    w.used = redis.call('ZCARD', w.key)
    if w.used >= w.limit then
      -- The request passes once enough of the oldest charges have left the window.
      local at = redis.call('ZRANGE', w.key, w.used - w.limit, w.used - w.limit, 'WITHSCORES')
      local retry = w.ms
      if at[2] then retry = tonumber(at[2]) + w.ms - now end
      refuse(sc.subject, 'window', w.ms, w.limit, retry)
    end
  end
  if sc.interval > 0 then
    sc.rkey = p .. 'r:' .. sc.subject
    local tat = tonumber(redis.call('GET', sc.rkey) or '0')
    if tat < now then tat = now end
    local allow_at = tat + sc.interval - sc.interval * sc.burst
    if now < allow_at then refuse(sc.subject, 'rate', sc.interval, sc.burst, allow_at - now) end
    sc.tat = tat + sc.interval
  end
  if sc.inflight >= 0 then
    sc.fkey = p .. 'f:' .. sc.subject
    redis.call('ZREMRANGEBYSCORE', sc.fkey, '-inf', now)
    local n = redis.call('ZCARD', sc.fkey)
    if n >= sc.inflight then refuse(sc.subject, 'in_flight', sc.inflight, n, -1) end
  end
end
if worst then return worst end

local out = {'admitted'}
for _, sc in ipairs(scopes) do
  for _, w in ipairs(sc.wins) do
    redis.call('ZADD', w.key, now, cid)
    redis.call('PEXPIRE', w.key, w.ms)
    local oldest = redis.call('ZRANGE', w.key, 0, 0, 'WITHSCORES')
    local n = #out
    out[n + 1], out[n + 2], out[n + 3] = sc.subject, w.ms, w.limit
    out[n + 4], out[n + 5] = w.used + 1, tonumber(oldest[2]) + w.ms - now
  end
  if sc.rkey then redis.call('SET', sc.rkey, sc.tat, 'PX', math.max(1, sc.tat - now)) end
  if sc.fkey then
    redis.call('ZADD', sc.fkey, now + lease, cid)
    redis.call('PEXPIRE', sc.fkey, lease)
  end
end
redis.call('SET', p .. 'c:' .. cid, 'charged', 'PX', keep)
if idem ~= '' then redis.call('SET', p .. 'i:' .. idem, cid, 'PX', keep) end
return out
