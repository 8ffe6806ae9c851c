-- tollgate: concurrency slots as leases, one sorted set per key.
--
-- KEYS[1]  the key's leases: member = lease id, score = when the lease expires (ms, server clock)
-- ARGV[1]  "acquire", "renew" or "release"
-- ARGV[2]  the lease id (unique per request)
-- ARGV[3]  the lease length (ms)
-- ARGV[4]  the limit (acquire only)
-- ARGV[5]  acquire only: a deadline in ms of the server's clock, or -1. The caller gives up
--          then: an acquire that runs later (a server thawing from a freeze) takes no slot and
--          answers { -1, held, now }.
--
-- Returns {ok, leases held after the call, now (ms)}. Expired leases (held by an instance that died or
-- stopped renewing) are dropped first, so their slots come back by themselves. Check and take
-- happen in this one script: two instances cannot both take the last slot.
--
-- The set expires with its longest lease (PEXPIREAT to its highest score), so a lease is never
-- cut short by another instance's shorter one (a rolling deploy that changes the lease length).
-- A key this script did not write (another type) is replaced; a lease claiming to outlive a
-- day (no lease is that long) is dropped.

if redis.replicate_commands then
  pcall(redis.replicate_commands)
end

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local key = KEYS[1]
local op = ARGV[1]
local id = ARGV[2]
local lease = tonumber(ARGV[3])
local max_lease = 86400000

local swept = redis.pcall('ZREMRANGEBYSCORE', key, '-inf', now)
if type(swept) == 'table' and swept.err then
  redis.call('DEL', key)
end
redis.call('ZREMRANGEBYSCORE', key, '(' .. string.format('%.0f', now + max_lease), '+inf')

-- The set lives exactly as long as its longest lease.
local function expire_with_longest()
  local top = redis.call('ZRANGE', key, -1, -1, 'WITHSCORES')
  if top[2] then
    redis.call('PEXPIREAT', key, string.format('%.0f', tonumber(top[2])))
  end
end

if op == 'acquire' then
  local limit = tonumber(ARGV[4])
  local deadline = tonumber(ARGV[5] or '-1')
  local held = redis.call('ZCARD', key)
  if deadline >= 0 and now > deadline then
    return { -1, held, now }
  end
  if held >= limit then
    return { 0, held, now }
  end
  redis.call('ZADD', key, string.format('%.0f', now + lease), id)
  expire_with_longest()
  return { 1, held + 1, now }
elseif op == 'renew' then
  if not redis.call('ZSCORE', key, id) then
    -- Expired before it was renewed: the slot may already be someone else's.
    return { 0, redis.call('ZCARD', key), now }
  end
  redis.call('ZADD', key, 'XX', string.format('%.0f', now + lease), id)
  expire_with_longest()
  return { 1, redis.call('ZCARD', key), now }
else
  redis.call('ZREM', key, id)
  return { 1, redis.call('ZCARD', key), now }
end
