-- tollgate: concurrency slots as leases, one sorted set per key.
--
-- KEYS[1]  the key's leases: member = lease id, score = when the lease expires (ms, server clock)
-- ARGV[1]  "acquire", "renew" or "release"
-- ARGV[2]  the lease id (unique per request)
-- ARGV[3]  the lease length (ms)
-- ARGV[4]  the limit (acquire only)
--
-- Returns {ok, leases held after the call}. Expired leases (held by an instance that died or
-- stopped renewing) are dropped first, so their slots come back by themselves. Check and take
-- happen in this one script: two instances cannot both take the last slot.

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local key = KEYS[1]
local op = ARGV[1]
local id = ARGV[2]
local lease = tonumber(ARGV[3])

redis.call('ZREMRANGEBYSCORE', key, '-inf', now)

if op == 'acquire' then
  local limit = tonumber(ARGV[4])
  local held = redis.call('ZCARD', key)
  if held >= limit then
    return { 0, held }
  end
  redis.call('ZADD', key, now + lease, id)
  -- Every lease has the same length, so the newest one expires last: the set may go with it.
  redis.call('PEXPIRE', key, lease)
  return { 1, held + 1 }
elseif op == 'renew' then
  if not redis.call('ZSCORE', key, id) then
    -- Expired before it was renewed: the slot may already be someone else's.
    return { 0, redis.call('ZCARD', key) }
  end
  redis.call('ZADD', key, 'XX', now + lease, id)
  redis.call('PEXPIRE', key, lease)
  return { 1, redis.call('ZCARD', key) }
else
  redis.call('ZREM', key, id)
  return { 1, redis.call('ZCARD', key) }
end
