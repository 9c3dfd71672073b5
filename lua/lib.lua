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

-- Slot metadata: "<reservation>|<touched 0/1>|<opening sender>|<user's previous unique time or ''>".
-- The reservation is kept after a touch so Confirm can still find its slot; Release needs
-- touched = 0. The previous unique time lets a release undo the slot's count in projections.
local function split_meta(m)
  local a = string.find(m, '|', 1, true)
  local b = string.find(m, '|', a + 1, true)
  local c = string.find(m, '|', b + 1, true)
  return string.sub(m, 1, a - 1), string.sub(m, a + 1, b - 1), string.sub(m, b + 1, c - 1), string.sub(m, c + 1)
end

local function join_meta(resv, touched, sender, prev)
  return resv .. '|' .. touched .. '|' .. sender .. '|' .. prev
end

-- A policy hash, with defaults for what it does not say. Tier changes made by auto_tier and the
-- projection state (up_at, up_from, flagged) live in the same hash.
local function read_policy(key, dtier, dmode, drules)
  local f = redis.call('HMGET', key, 'tier', 'custom', 'mode', 'status', 'quality', 'mps', 'pint', 'pburst',
    'head', 'scap', 'mcap', 'mper', 'rules', 'auto', 'flagged', 'up_at', 'up_from')
  return {
    tier = f[1] or dtier, custom = tonumber(f[2] or '0'), mode = f[3] or dmode,
    status = f[4] or 'connected', quality = f[5] or '', mps = tonumber(f[6] or '0'),
    pint = tonumber(f[7] or '0'), pburst = tonumber(f[8] or '0'), head = tonumber(f[9] or '0'),
    scap = tonumber(f[10] or '0'), mcap = tonumber(f[11] or '0'), mper = tonumber(f[12] or '0'),
    rules = f[13] or drules, auto = f[14] == '1', flagged = tonumber(f[15] or ''),
    up_at = tonumber(f[16] or ''), up_from = f[17] or '',
  }
end

-- The fields of a policy as the Rust side reads them back (Inspect).
local function policy_out(p, out)
  local fields = { p.tier, p.custom, p.mode, p.status, p.quality, p.mps, p.pint, p.pburst, p.head, p.scap,
    p.mcap, p.mper, p.rules, p.auto and 1 or 0 }
  for _, v in ipairs(fields) do
    out[#out + 1] = v
  end
end

local function limit_of(p)
  if p.custom > 0 then
    return p.custom
  end
  return TIER_LIMIT[p.tier]
end

local function effective_of(p)
  local head = p.head
  if head > 99 then
    head = 99
  end
  return math.floor(limit_of(p) * (100 - head) / 100)
end

local BLOCKING = { paused = true, banned = true, disconnected = true }

local function eligible(p)
  return p.status == 'connected'
    and (p.quality == '' or p.quality == 'green' or (p.rules == 'legacy' and p.quality == 'yellow'))
end

-- Applies the tier changes due by `now` to a policy with auto_tier; writes them when `persist`.
local function settle(p, key, now, persist)
  local changed = false
  while p.auto do
    local nxt = TIER_NEXT[p.rules][p.tier]
    local prev = TIER_PREV[p.tier]
    if p.up_at and p.up_from == p.tier and p.up_at <= now and eligible(p) and nxt then
      p.tier, p.up_at, p.up_from, changed = nxt, nil, '', true
    elseif p.rules == 'legacy' and p.status == 'flagged' and p.flagged and p.flagged + FLAGGED_DOWNGRADE_MS <= now and prev then
      p.tier, p.flagged, changed = prev, p.flagged + FLAGGED_DOWNGRADE_MS, true
    else
      break
    end
  end
  if changed and persist then
    redis.call('HSET', key, 'tier', p.tier, 'flagged', p.flagged and fmt(p.flagged) or '')
    if not p.up_at then
      redis.call('HDEL', key, 'up_at', 'up_from')
    end
  end
end

-- GCRA, exactly as model::gcra: returns the new TAT, or nil and the wait in ms (rounded up).
local function gcra(tat, now_us, interval, burst)
  local new_tat = math.max(tat, now_us) + interval
  local over = new_tat - now_us - burst * interval
  if over > 0 then
    return nil, math.floor((over + 999) / 1000)
  end
  return new_tat
end

-- When the count of unique users reached the bar for the next tier, re-derived from the users
-- still counted (as model::crossing_time): the threshold-th in the trailing window. nil: not reached.
local function crossing_time(uq, rules, tier, now)
  local limit = TIER_LIMIT[tier]
  if limit == 0 then
    return nil
  end
  local best
  if not (rules == 'legacy' and tier == '50') then
    local row = redis.call('ZRANGEBYSCORE', uq, '(' .. fmt(now - WEEK_MS), '+inf', 'WITHSCORES', 'LIMIT', math.floor(limit / 2) - 1, 1)
    best = row[2] and tonumber(row[2])
  end
  if rules == 'portfolio' and tier == '250' then
    local row = redis.call('ZRANGEBYSCORE', uq, '(' .. fmt(now - MONTH_MS), '+inf', 'WITHSCORES', 'LIMIT', PORTFOLIO_ENTRY_UNIQUES - 1, 1)
    local t = row[2] and tonumber(row[2])
    if t and (not best or t < best) then
      best = t
    end
  end
  return best
end

-- Frees a slot opened by `resv` while no later counted delivery touched it: the window entry,
-- its metadata, the opener's entry in a portfolio's per-sender index, and its count in the
-- projections (the user's previous unique time comes back; a pending upgrade is re-derived
-- without it). Returns true when released.
local function release_slot(win, meta, uq, ws_prefix, r, resv, now, polkey, dtier, drules)
  local s = redis.call('ZSCORE', win, r)
  if not s or tonumber(s) <= now then
    return false
  end
  local m = redis.call('HGET', meta, r)
  if not m then
    return false
  end
  local mresv, touched, opener, prev = split_meta(m)
  if mresv ~= resv or touched ~= '0' then
    return false
  end
  redis.call('ZREM', win, r)
  redis.call('HDEL', meta, r)
  if ws_prefix ~= '' then
    redis.call('ZREM', ws_prefix .. opener, r)
  end
  local opened = string.sub(resv, 1, string.find(resv, '.', 1, true) - 1)
  local u = redis.call('ZSCORE', uq, r)
  if u and tonumber(u) == tonumber(opened) then
    if prev == '' then
      redis.call('ZREM', uq, r)
    else
      redis.call('ZADD', uq, prev, r)
    end
    local f = redis.call('HMGET', polkey, 'up_at', 'up_from', 'tier', 'rules')
    local tier, rules = f[3] or dtier, f[4] or drules
    if f[1] and f[2] == tier then
      local t = crossing_time(uq, rules, tier, now)
      if t then
        redis.call('HSET', polkey, 'up_at', fmt(t + UPGRADE_DELAY_MS[rules]))
      else
        redis.call('HDEL', polkey, 'up_at', 'up_from')
      end
    end
  end
  return true
end

-- Does the count of unique users cross the bar for the next tier? As model::upgrade_threshold_met.
local function upgrade_threshold_met(rules, tier, u7, u30)
  local limit = TIER_LIMIT[tier]
  if limit == 0 then
    return false
  end
  local half = math.floor(limit / 2)
  if rules == 'legacy' then
    return tier ~= '50' and u7 >= half
  end
  return u7 >= half or (tier == '250' and u30 >= PORTFOLIO_ENTRY_UNIQUES)
end

