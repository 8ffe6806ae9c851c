-- tollgate: GCRA for every quota of one request, decided atomically.
--
-- KEYS[i]  the state of quota i: its theoretical arrival time (TAT) in microseconds, as an
--          integer string. All keys of one call share a hash tag, so they live in one slot.
-- ARGV[1]  now in microseconds, or -1 to use the server's clock (TIME). Only tests pass a time.
-- ARGV[2]  cost of the request in units (0 <= cost <= the smallest burst; checked by the caller)
-- ARGV[2i+1], ARGV[2i+2]  for quota i: the emission interval T and the burst span B*T, in
--          microseconds
--
-- Returns a flat array of integers: allowed (1 or 0), then for each quota
--   allowed, remaining, reset_after_us, retry_after_us
--
-- A request passes only if every quota allows it; then every TAT is written with an expiry at
-- the moment it stops mattering (TAT - now, in whole milliseconds rounded up, at least 1).
-- A refused request writes nothing. Read, decide and write happen in this one script, so they
-- are atomic: there is no window between a read and a write for another instance to use.

local now = tonumber(ARGV[1])
if now < 0 then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000000 + tonumber(t[2])
end
local cost = tonumber(ARGV[2])
local n = #KEYS

local tat = {}
local repaired = {}
local all = 1
for i = 1, n do
  local T = tonumber(ARGV[2 * i + 1])
  local span = tonumber(ARGV[2 * i + 2])
  -- A missing or unreadable state is a fresh key.
  local stored = tonumber(redis.call('GET', KEYS[i]))
  if stored == nil or stored < now then
    stored = now
  elseif stored > now + span then
    -- Impossible for a state this script wrote, unless the clock moved back (a failover to a
    -- server whose clock is behind) or something else wrote the key: cap it at a spent burst
    -- rather than refuse the client for however long the bad value says.
    stored = now + span
    repaired[i] = true
  end
  tat[i] = stored
  if stored + cost * T - now > span then
    all = 0
  end
end

local out = { all }
for i = 1, n do
  local T = tonumber(ARGV[2 * i + 1])
  local span = tonumber(ARGV[2 * i + 2])
  local new_tat = tat[i] + cost * T
  local ahead = new_tat - now
  if ahead <= span then
    if all == 1 then
      if ahead > 0 then
        local px = math.ceil(ahead / 1000)
        if px < 1 then px = 1 end
        redis.call('SET', KEYS[i], string.format('%.0f', new_tat), 'PX', px)
      end
      out[#out + 1] = 1
      out[#out + 1] = math.floor((span - ahead) / T)
      out[#out + 1] = ahead
      out[#out + 1] = 0
    else
      -- This quota allows, another refuses: nothing is spent here.
      local used = tat[i] - now
      out[#out + 1] = 1
      out[#out + 1] = math.floor((span - used) / T)
      out[#out + 1] = used
      out[#out + 1] = 0
    end
  else
    local used = tat[i] - now
    if repaired[i] then
      -- Keep the repaired value, or the bad one would refuse this client again next time.
      redis.call('SET', KEYS[i], string.format('%.0f', tat[i]), 'PX', math.max(1, math.ceil(used / 1000)))
    end
    local free = span - used
    if free < 0 then free = 0 end
    out[#out + 1] = 0
    out[#out + 1] = math.floor(free / T)
    out[#out + 1] = used
    out[#out + 1] = ahead - span
  end
end
return out
