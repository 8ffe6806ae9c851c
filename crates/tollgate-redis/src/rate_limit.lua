-- tollgate: the checks of one or more requests, each deciding every quota of its request
-- atomically, one after the other in the order given.
--
-- The store sends the checks that are in flight at the same moment in one call: the decisions
-- are the ones separate calls in that order would give, at the same server time (a check sees
-- what the checks before it wrote, and a check past its own deadline writes nothing).
--
-- KEYS     the states of each check's quotas, check after check. A state is named by its quota
--          (so reordering or adding quotas in a deploy never mixes states up). All keys of one
--          check share a hash tag; on a cluster all keys of one call share a slot.
-- ARGV     one argument: the call's integers as a JSON array (decoded by the cjson library
--          every Redis since 2.6 bundles: one C loop, where an argument per number cost the
--          client an encoded frame and Redis a parsed object and a Lua string each). In order,
--          the call's shapes, then its checks:
--   S        the number of shapes; negative (-S) when each check's time is the time to decide
--            it at (a test clock: only tests pass a time) rather than its deadline. Then each
--            shape: what every check of a policy sends alike, sent once per call however many
--            of its checks share it:
--     n      its number of quotas, then for each quota its algorithm and two parameters:
--              0 (GCRA):           emission interval T (us), burst span B*T (us)
--              1 (fixed window):   window W (ms), limit L
--              2 (sliding window): window W (ms), limit L
--   then each check: its shape (1 to S; absent when S is 1), its cost in units (0 <= cost <=
--            the smallest burst; checked by the caller), its time, then for each window quota
--            of its shape, in order, this key's window offset (ms). Its keys are the next n
--            keys.
--   time     a deadline (S > 0), in microseconds of the server's clock, or -1 for none: the
--            checks are decided at the server's time (TIME, read once per call), and a check
--            past its deadline (a server thawing from a freeze, a queue that drained late)
--            writes nothing and answers only its status, -1, its caller having given up. Or
--            (S < 0) the time to decide the check at, in microseconds, with no deadline.
--
-- States: GCRA stores the theoretical arrival time (TAT, us); a fixed window "end_ms count";
-- a sliding window "end_ms current previous" (the end of the current window). A value this
-- script could not have written (not those shapes, a window that ends after the next one, a
-- count above the limit, a key of another type) counts as absent, so it is overwritten, with an
-- expiry, by the next allowed request. A state of the next window (the clock stepped back)
-- still counts, in its own window: docs/algorithms.md, "When the clock steps back".
--
-- Returns one flat array of integers for the whole call, packed as MessagePack by the cmsgpack
-- library Redis bundles (one string: an array replied as such, or one per check, is a frame
-- per element for the client to decode): the server's time `now` (us) the checks were decided
-- at (0 when the times were given), then for each check, in order, its status: 1 allowed, 0
-- refused, or -1 past its deadline (wrote nothing; nothing follows for it); then, unless -1,
-- for each of its quotas
--   allowed, remaining, reset_after_us, retry_after_us, next_unit_us
-- (next_unit_us: until one more unit than `remaining` is available, 0 when the quota is full).
--
-- A request passes only if every quota allows it; then every state is written with an expiry
-- at the moment it stops mattering (in whole milliseconds rounded up, at least 1). A refused
-- request writes nothing (except to repair an impossible GCRA value, see below). Read, decide
-- and write happen in this one script, so they are atomic. All arithmetic is on integers below
-- 2^53, exact in Lua's doubles; it mirrors crates/tollgate/src/algorithm.rs step by step.

-- Before Redis 5, a write after TIME is refused unless the script replicates its effects
-- (the default since 5, and the only mode since 7, where this is a no-op: skipped there, on
-- the version number that 7 introduced, since the protected call costs about a microsecond).
if redis.replicate_commands and not redis.REDIS_VERSION_NUM then
  pcall(redis.replicate_commands)
end

-- The server's time, read once per call, when a check needs it.
local server_now
local function server_time()
  if server_now == nil then
    local t = redis.call('TIME')
    server_now = tonumber(t[1]) * 1000000 + tonumber(t[2])
  end
  return server_now
end

-- A non-negative integer of at most `digits` digits, else nil ("nan", "inf", "-5", "1e300",
-- "12abc" and the like are not numbers this script wrote).
local function int(s, digits)
  if s and #s <= digits and string.match(s, '^%d+$') then return tonumber(s) end
  return nil
end

-- What this call has written so far, by key: { value, px }. A key that several checks of one
-- call decide (a busy client) is read once and written once, at the end of the call, with what
-- the last of them wrote; each check still reads what the checks before it wrote. A GCRA
-- state is kept as its number until then: formatting and parsing it again for every check of
-- a busy key cost more than the decision.
local written = {}
local order = {}

-- The reply (see above), appended to as the checks are decided; out[1] is set at the end.
-- Made with room for a call of one check of one quota (the array part grows by doubling), and
-- cut after its last element when the call ends.
local out = { 0, 0, 0, 0, 0, 0, 0 }
local m = 1
local function put(x)
  m = m + 1
  out[m] = x
end

-- The stored string (or a GCRA state this call wrote, as a number), or nil when the key is
-- absent or holds another type.
local function read(key)
  local w = written[key]
  if w then return w[1] end
  local raw = redis.pcall('GET', key)
  if type(raw) ~= 'string' then return nil end
  return raw
end

-- Stores `value` (a string, or a GCRA state as a number) under `key`, expiring in `px` ms,
-- when the call ends.
local function write(key, value, px)
  if written[key] == nil then order[#order + 1] = key end
  written[key] = { value, px }
end

-- A GCRA state as read: a number this call wrote, or the stored digits.
local function tat_of(raw)
  if type(raw) == 'number' then return raw end
  return int(raw, 16)
end

-- Units come back one emission interval `T` apart, the last at the reset: the time until one
-- more than `left` of a burst of `B` is available.
local function next_unit(B, T, left, reset)
  if left >= B then return 0 end
  local n = reset - (B - left - 1) * T
  if n < 0 then n = 0 end
  return n
end

-- The one-quota GCRA check (the common policy), deciding exactly as the general path below
-- does, without its per-quota tables and closures.
local function check_gcra(key, T, span, now, cost)
  local tat = tat_of(read(key))
  local repaired = false
  if tat == nil or tat < now then
    tat = now
  elseif tat > now + span then
    -- As the general path: cap an impossible value at a spent burst.
    tat = now + span
    repaired = true
  end
  local new_tat = tat + cost * T
  local ahead = new_tat - now
  local B = span / T
  if ahead <= span then
    local left = math.floor((span - ahead) / T)
    if ahead > 0 then write(key, new_tat, math.max(1, math.ceil(ahead / 1000))) end
    out[m + 1], out[m + 2], out[m + 3], out[m + 4], out[m + 5], out[m + 6] =
      1, 1, left, ahead, 0, next_unit(B, T, left, ahead)
    m = m + 6
    return
  end
  if repaired then write(key, tat, math.max(1, math.ceil((tat - now) / 1000))) end
  local used = tat - now
  local free = span - used
  if free < 0 then free = 0 end
  local left = math.floor(free / T)
  out[m + 1], out[m + 2], out[m + 3], out[m + 4], out[m + 5], out[m + 6] =
    0, 0, left, used, ahead - span, next_unit(B, T, left, used)
  m = m + 6
end

-- The call's integers, read from their one argument (a JSON array): from here on ARGV is
-- their list.
local ARGV = cjson.decode(ARGV[1])

-- The number of shapes, and how each check's time reads (see ARGV above).
local n_shapes = ARGV[1]
local given_times = n_shapes < 0
if given_times then n_shapes = -n_shapes end

-- The time to decide a check of `time` at (see ARGV above), and whether it is past its
-- deadline.
local function moment(time)
  if given_times then return time, false end
  local now = server_time()
  return now, time >= 0 and now > time
end

-- One check of `shape` at `cost` and `time`: its keys are KEYS[k + 1 .. k + n], its window
-- offsets ARGV[o], ARGV[o + 1], ...
local function check(k, shape, cost, time, o)
  local now, late = moment(time)
  if late then return put(-1) end
  local n = shape.n
  if n == 1 and shape[1][1] == 0 then
    return check_gcra(KEYS[k + 1], shape[1][2], shape[1][3], now, cost)
  end
  local now_ms = math.floor(now / 1000)

  local function window_start(w, offset)
    local x = now_ms + offset
    return x - (x % w) - offset
  end

  local function px_until(t_ms)
    local px = t_ms - now_ms
    if px < 1 then px = 1 end
    return px
  end

  -- Each entry: allowed, write (a function or nil), spent {remaining, reset_us, retry_us},
  -- unspent {remaining, reset_us, retry_us}, repair (a function or nil).
  local evals = {}
  local all = 1

  for i = 1, n do
    local q = shape[i]
    local algo, p1, p2, p3 = q[1], q[2], q[3], 0
    if algo ~= 0 then
      p3 = ARGV[o]
      o = o + 1
    end
    local key = KEYS[k + i]
    local raw = read(key)
    local e = {}

    if algo == 0 then
      local T, span = p1, p2
      local tat = tat_of(raw)
      if tat == nil or tat < now then
        tat = now
      elseif tat > now + span then
        -- Impossible for a state this script wrote, unless the clock moved back (a failover to a
        -- server whose clock is behind) or something else wrote the key: cap it at a spent burst
        -- rather than refuse the client for however long the bad value says.
        tat = now + span
        e.repair = function()
          write(key, tat, math.max(1, math.ceil((tat - now) / 1000)))
        end
      end
      local new_tat = tat + cost * T
      local ahead = new_tat - now
      local used = tat - now
      local free = span - used
      if free < 0 then free = 0 end
      e.allowed = ahead <= span
      local B = span / T
      local left = math.floor(free / T)
      e.unspent = { left, used, 0, next_unit(B, T, left, used) }
      if e.allowed then
        local spent_left = math.floor((span - ahead) / T)
        e.spent = { spent_left, ahead, 0, next_unit(B, T, spent_left, ahead) }
        if ahead > 0 then
          e.write = function()
            write(key, new_tat, math.max(1, math.ceil(ahead / 1000)))
          end
        end
      else
        e.unspent[3] = ahead - span
      end

    elseif algo == 1 then
      local w, limit, offset = p1, p2, p3
      local start_ms = window_start(w, offset)
      local end_ms = start_ms + w
      local count = 0
      if raw then
        local s_end, s_count = string.match(raw, '^(%d+) (%d+)$')
        s_end, s_count = int(s_end, 15), int(s_count, 10)
        -- A stored window that has not ended is the current one, or (after the server's clock
        -- stepped back) the next one: its count stands and the request is decided in it. One
        -- further ahead counts as absent. As algorithm.rs.
        if s_end and s_count and s_end > now_ms and s_end <= end_ms + w and s_count <= limit then
          count = s_count
          if s_end > end_ms then end_ms = end_ms + w end
        end
      end
      local until_end = (end_ms - now_ms) * 1000
      local after = count + cost
      e.allowed = after <= limit
      local reset_spent, reset_unspent = 0, 0
      if after > 0 then reset_spent = until_end end
      if count > 0 then reset_unspent = until_end end
      -- A fixed window gives every unit back when it ends.
      e.spent = { math.max(limit - after, 0), reset_spent, 0, reset_spent }
      e.unspent = { math.max(limit - count, 0), reset_unspent, 0, reset_unspent }
      if not e.allowed then e.unspent[3] = until_end end
      if e.allowed and after > 0 then
        e.write = function()
          write(key, string.format('%.0f %.0f', end_ms, after), px_until(end_ms))
        end
      end

    else
      local w, limit, offset = p1, p2, p3
      local start_ms = window_start(w, offset)
      local end_ms = start_ms + w
      local curr, prev = 0, 0
      if raw then
        local s_end, s_curr, s_prev = string.match(raw, '^(%d+) (%d+) (%d+)$')
        s_end, s_curr, s_prev = int(s_end, 15), int(s_curr, 10), int(s_prev, 10)
        if s_end and s_curr and s_prev and s_curr <= limit and s_prev <= limit
            and s_end <= end_ms + w then
          if s_end >= end_ms then
            -- The current window, or (after the clock stepped back) the next one: then the
            -- request is decided at the start of that window. As algorithm.rs.
            curr, prev = s_curr, s_prev
            if s_end > end_ms then
              start_ms = end_ms
              end_ms = end_ms + w
            end
          elseif s_end == end_ms - w then
            curr, prev = 0, s_curr
          end
        end
      end
      local elapsed = math.max(now_ms, start_ms) - start_ms
      local lw = limit * w
      -- The estimate, scaled by the window length to stay in integers.
      local est = prev * (w - elapsed) + curr * w
      e.allowed = est + cost * w <= lw
      local function reset(c)
        if c > 0 then return (end_ms + w - now_ms) * 1000 end
        if prev > 0 then return (end_ms - now_ms) * 1000 end
        return 0
      end
      -- How long until `need` more units fit, with `c` counted in this window, when they do not
      -- fit now (us). As algorithm.rs.
      local function wait(c, need)
        if c + need <= limit then
          -- Within this window, once enough of the previous window has slid out.
          local room = (limit - c - need) * w
          local d = (end_ms - now_ms) - math.floor(room / math.max(prev, 1))
          if d < 1 then d = 1 end
          return d * 1000
        end
        -- In the next window, once enough of this one has slid out.
        local room = math.max(limit - need, 0) * w
        local t = w - math.floor(room / math.max(c, 1))
        if t < 0 then t = 0 end
        return ((end_ms - now_ms) + t) * 1000
      end
      local retry = 0
      if not e.allowed then retry = wait(curr, cost) end
      -- Units left with `c` counted and the estimate `x`, and the wait for one more.
      local function left(c, x)
        local r = math.floor(math.max(lw - x, 0) / w)
        if r >= limit then return r, 0 end
        return r, wait(c, r + 1)
      end
      local spent_left, spent_next = left(curr + cost, est + cost * w)
      local unspent_left, unspent_next = left(curr, est)
      e.spent = { spent_left, reset(curr + cost), 0, spent_next }
      e.unspent = { unspent_left, reset(curr), retry, unspent_next }
      if e.allowed and curr + cost > 0 then
        e.write = function()
          write(key, string.format('%.0f %.0f %.0f', end_ms, curr + cost, prev), px_until(end_ms + w))
        end
      end
    end

    if not e.allowed then all = 0 end
    evals[i] = e
  end

  put(all)
  for i = 1, n do
    local e = evals[i]
    local r
    if all == 1 then
      if e.write then e.write() end
      r = e.spent
    else
      if e.repair then e.repair() end
      r = e.unspent
    end
    put(e.allowed and 1 or 0)
    put(r[1])
    put(r[2])
    put(r[3])
    put(r[4])
  end
end

local a, k = 2, 0
if n_shapes == 1 and ARGV[2] == 1 and ARGV[3] == 0 then
  -- One shape, of one GCRA quota (the common policy): its checks are decided on a path of
  -- locals, without the tables of the general path.
  local T, span = ARGV[4], ARGV[5]
  a = 6
  while a <= #ARGV do
    k = k + 1
    local now, late = moment(ARGV[a + 1])
    if late then
      put(-1)
    else
      check_gcra(KEYS[k], T, span, now, ARGV[a])
    end
    a = a + 2
  end
else
  -- The shapes: shape.n quotas, shape[i] = { algorithm, p1, p2 }, shape.windows of them
  -- windows. Read once per call, not once per check.
  local shapes = {}
  for s = 1, n_shapes do
    local n = ARGV[a]
    local shape = { n = n, windows = 0 }
    for i = 1, n do
      local b = a + 3 * i - 2
      local algo = ARGV[b]
      shape[i] = { algo, ARGV[b + 1], ARGV[b + 2] }
      if algo ~= 0 then shape.windows = shape.windows + 1 end
    end
    shapes[s] = shape
    a = a + 1 + 3 * n
  end
  local one = n_shapes == 1 and shapes[1]
  while a <= #ARGV do
    -- Each check's shape, unless all share the one.
    local shape = one
    if not one then
      shape = shapes[ARGV[a]]
      a = a + 1
    end
    check(k, shape, ARGV[a], ARGV[a + 1], a + 2)
    k = k + shape.n
    a = a + 2 + shape.windows
  end
end
for _, key in ipairs(order) do
  local w = written[key]
  local value = w[1]
  if type(value) == 'number' then value = string.format('%.0f', value) end
  redis.call('SET', key, value, 'PX', w[2])
end
out[1] = server_now or 0
-- Cut after the last element, up to the room `out` was made with (its length, counted before
-- the cut: nothing in it is nil yet): a call of late checks only (one number each) leaves it
-- short of that, and cmsgpack packs a table with a gap as a map, where Redis's array reply
-- stopped at the first nil.
for i = m + 1, #out do out[i] = nil end
-- One string (see above): an array replied as such is a frame per number for the client to
-- decode, where cmsgpack's C loop writes them all, for about what Redis spent on the array.
return cmsgpack.pack(out)
