-- lib.lua: helpers prepended to every waquota script (not a script of its own).
--
-- Times are integer milliseconds since the Unix epoch. Numbers go back to Redis through
-- string.format('%d') so that 13-digit timestamps never pass through Lua's %.14g.

local function fmt(n)
  return string.format('%d', n)
end

-- The request's clock: the trusted client time when given, else this Redis server's TIME, so
-- that every instance and worker shares one clock.
local function clock(at)
  if at ~= '' then
    return tonumber(at)
  end
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- Does `sender` keep its state at this home? A sender's own home ("s") holds it unless the
-- "away" key names the portfolio it moved to; a portfolio home ("p") holds its members' state.
-- Returns true, or false and where to look next (a portfolio id, or "" for the sender's own home).
local function resident(kind, residency_key, sender)
  if kind == 's' then
    local away = redis.call('GET', residency_key)
    if away then
      return false, away
    end
    return true
  end
  if redis.call('SISMEMBER', residency_key, sender) == 1 then
    return true
  end
  return false, ''
end

-- Keep `key` alive at least until `until_ms` on the request's clock. The TTL is relative to that
-- clock, never absolute, so a trusted clock far from real time (a replay of last year) cannot
-- make Redis drop state early; a TTL is only ever extended.
local function keep(key, until_ms, now, slack)
  local want = until_ms - now + slack
  if want < 1 then
    want = 1
  end
  local cur = redis.call('PTTL', key)
  if cur == -1 or (cur >= 0 and cur < want) then
    redis.call('PEXPIRE', key, fmt(want))
  end
end

-- Latest slot expiry in a window zset (or `now` when empty).
local function latest(zkey, now)
  local last = redis.call('ZRANGE', zkey, -1, -1, 'WITHSCORES')
  if last[2] then
    return tonumber(last[2])
  end
  return now
end

-- Drops up to `max` expired slots (expiry <= now) and their metadata. Counting never relies on
-- trimming (live slots are counted with ZCOUNT over (now, +inf)), so the bound only spreads the
-- work of a large expiry over several requests.
local function trim(win, meta, now, max)
  local gone = redis.call('ZRANGEBYSCORE', win, '-inf', fmt(now), 'LIMIT', 0, max)
  if #gone > 0 then
    redis.call('ZREM', win, unpack(gone))
    redis.call('HDEL', meta, unpack(gone))
  end
end

-- Byte-wise a > b (Lua's own string comparison follows the locale; zsets order by bytes).
local function bytes_gt(a, b)
  local n = math.min(#a, #b)
  for i = 1, n do
    local x, y = string.byte(a, i), string.byte(b, i)
    if x ~= y then
      return x > y
    end
  end
  return #a > #b
end

-- Calls redis.call(cmd, key, ...) with `args` in chunks, so no unpack() exceeds Lua's stack.
local function chunked(cmd, key, args, step)
  for i = 1, #args, step do
    local last = math.min(i + step - 1, #args)
    redis.call(cmd, key, unpack(args, i, last))
  end
end

