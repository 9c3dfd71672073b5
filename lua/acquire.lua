-- acquire.lua: decides, in one atomic step, whether a sender may message each recipient now
-- (Acquire is a batch of one). Checks run in the order of PRODUCT.md §2.4 (first refusal wins):
-- sender status; service-window rules; messaging limit and sender cap; marketing cap; pair rate;
-- throughput. Everything is decided against an overlay of this batch's changes and written at
-- the end, so a refused message consumes nothing and a dry run runs the same code, writing nothing.
--
-- KEYS[1]  window          zset   recipient -> slot expiry (ms)
-- KEYS[2]  window meta     hash   recipient -> "<reservation>|<touched>|<opener>|<prev unique>"
-- KEYS[3]  sequence        string reservation counter of this window
-- KEYS[4]  window policy   hash   the home's policy (a sender's own, or the portfolio's)
-- KEYS[5]  service         zset   recipient -> service window expiry (ms), of this sender
-- KEYS[6]  residency       sender home: its "away" string; portfolio home: its members set
-- KEYS[7]  sender policy   hash   the sender's own policy (= KEYS[4] at a sender home)
-- KEYS[8]  sender slots    zset   portfolio home: recipient -> expiry of the slots this sender opened
-- KEYS[9]  throughput      string the sender's GCRA theoretical arrival time (us)
-- KEYS[10] pair rates      zset   recipient -> the pair's GCRA theoretical arrival time (us)
-- KEYS[11] marketing log   hash   recipient -> "t1,t2,..." recent marketing sends (ms)
-- KEYS[12] marketing holds zset   recipient -> hold until (ms) (WhatsApp error 131049)
-- KEYS[13] uniques         zset   recipient -> when it last got a new slot (ms): projections
-- ARGV[1] now (ms), or "" for Redis TIME
-- ARGV[2] home kind: "s" (the sender's own window) or "p" (its portfolio's)
-- ARGV[3] sender
-- ARGV[4] message kind: "t" template, "f" free-form
-- ARGV[5] dry run: "1" decides without writing
-- ARGV[6] marketing: "1" when the category is marketing
-- ARGV[7..9] the home's default tier, mode, rule set
-- ARGV[10..12] default messages per second, pair interval (ms), pair burst
-- ARGV[13] slot length (ms), ARGV[14] TTL slack (ms), ARGV[15] most expired slots trimmed per call
-- ARGV[16..] recipients, normalised
-- Returns {"moved", portfolio|""} when the sender's state lives at another home; otherwise
-- {now, limit, tier, effective limit, then per recipient: decision, expires_at|-1,
-- retry_after|-1, used, reservation|""}. Decisions as model::Decision::code.

local win, meta, seqkey, wpolkey, service = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local spolkey, wskey, tpkey, prkey, mkkey, mhkey, uqkey = KEYS[7], KEYS[8], KEYS[9], KEYS[10], KEYS[11], KEYS[12], KEYS[13]
local now = clock(ARGV[1])
local ok, where = resident(ARGV[2], KEYS[6], ARGV[3])
if not ok then
  return { 'moved', where }
end

local sender = ARGV[3]
local at_portfolio = ARGV[2] == 'p'
local free_form = ARGV[4] == 'f'
local dry = ARGV[5] == '1'
local marketing = ARGV[6] == '1'
local slot_ms, slack = tonumber(ARGV[13]), tonumber(ARGV[14])
local now_us = now * 1000

local W = read_policy(wpolkey, ARGV[7], ARGV[8], ARGV[9])
settle(W, wpolkey, now, not dry)
local S = W
if at_portfolio then
  S = read_policy(spolkey, ARGV[7], ARGV[8], ARGV[9])
end
local limit, effective = limit_of(W), effective_of(W)
local rolling = W.mode == 'rolling'
local blocked = BLOCKING[W.status] or BLOCKING[S.status]
local restricted = W.status == 'restricted' or S.status == 'restricted'
local mps = S.mps > 0 and S.mps or tonumber(ARGV[10])
if mps < 1 then
  mps = 1
end
local interval, burst = math.floor(1000000 / mps), mps
local pair_interval = (S.pint > 0 and S.pint or tonumber(ARGV[11])) * 1000
local pair_burst = S.pburst > 0 and S.pburst or tonumber(ARGV[12])
if pair_burst < 1 then
  pair_burst = 1
end
local mcap = S.mcap
local mper = S.mper > 0 and S.mper or 86400000
local scap = at_portfolio and S.scap or 0
local ws_prefix = string.sub(wskey, 1, #wskey - #sender)

if not dry then
  trim(win, meta, now, tonumber(ARGV[15]))
end
local live = '(' .. fmt(now)
local used = redis.call('ZCOUNT', win, live, '+inf')
local held = 0
if scap > 0 then
  held = redis.call('ZCOUNT', wskey, live, '+inf')
end
local tat = tonumber(redis.call('GET', tpkey) or '') or now_us

-- The overlay of this batch's changes.
local moved, nmoved = {}, 0 -- window: recipient -> new expiry
local wsmoved = {} -- per opener: recipient -> new expiry in its sender-slots index
local metas = {} -- recipient -> metadata to write
local ptat = {} -- recipient -> new pair TAT
local mtimes = {} -- recipient -> marketing send times to write
local uniques = {} -- recipient -> true for users counted new in this batch
local seq = nil
local tat_changed = false

-- The (k+1)-th earliest expiry among `rows` (a zset range) with an overlay applied.
local function kth_of(key, overlay, k)
  local n = 0
  for _ in pairs(overlay) do
    n = n + 1
  end
  local rows = redis.call('ZRANGEBYSCORE', key, live, '+inf', 'WITHSCORES', 'LIMIT', 0, k + n + 1)
  local ex = {}
  for j = 1, #rows, 2 do
    if not overlay[rows[j]] then
      ex[#ex + 1] = tonumber(rows[j + 1])
    end
  end
  for _, e in pairs(overlay) do
    ex[#ex + 1] = e
  end
  table.sort(ex)
  return ex[k + 1]
end

local function set_slot(r, until_ms)
  if not moved[r] then
    nmoved = nmoved + 1
  end
  moved[r] = until_ms
end

local function set_sender_slot(opener, r, until_ms)
  wsmoved[opener] = wsmoved[opener] or {}
  wsmoved[opener][r] = until_ms
end

local function meta_of(r)
  if metas[r] then
    return metas[r]
  end
  local m = redis.call('HGET', meta, r)
  if not m then
    return { '', '1', sender, '' }
  end
  local a, b, c, d = split_meta(m)
  return { a, b, c, d }
end

local function marketing_times(r)
  local times = mtimes[r]
  if not times then
    times = {}
    local stored = redis.call('HGET', mkkey, r)
    if stored then
      for t in string.gmatch(stored, '[^,]+') do
        times[#times + 1] = tonumber(t)
      end
    end
  end
  local kept = {}
  for _, t in ipairs(times) do
    if t > now - mper then
      kept[#kept + 1] = t
    end
  end
  table.sort(kept)
  return kept
end

local function decide(r)
  if blocked then
    return 8
  end
  local sw = redis.call('ZSCORE', service, r)
  sw = sw and tonumber(sw)
  if sw and sw <= now then
    sw = nil
  end
  local cur = moved[r]
  if not cur then
    local s = redis.call('ZSCORE', win, r)
    cur = s and tonumber(s)
  end
  if cur and cur <= now then
    cur = nil
  end
  if not sw and (free_form or (restricted and not cur)) then
    return 5
  end
  -- The time-bound checks, in the order of PRODUCT.md §2.4: the first that refuses is the one
  -- reported, and retry_after is when every one of them passes (each passes from some moment
  -- on), or none when one never does (an effective limit of 0). As State::acquire.
  local refused, passes_at, never = nil, now, false
  local function refuse(d, at)
    refused = refused or d
    if not at then
      never = true
    elseif at > passes_at then
      passes_at = at
    end
  end
  if not sw and not cur then
    local over_limit = limit > 0 and used >= effective
    local over_cap = scap > 0 and held >= scap
    if over_limit or over_cap then
      local w, c = now, now
      if over_limit then
        w = kth_of(win, moved, used - effective)
      end
      if over_cap then
        c = kth_of(wskey, wsmoved[sender] or {}, held - scap)
      end
      if w and c then
        refuse(4, math.max(w, c))
      else
        refuse(4, nil)
      end
    end
  end
  if marketing then
    local h = redis.call('ZSCORE', mhkey, r)
    h = h and tonumber(h)
    if h and h > now then
      refuse(9, h)
    end
    if mcap > 0 then
      local times = marketing_times(r)
      if #times >= mcap then
        refuse(9, times[#times - mcap + 1] + mper)
      end
    end
  end
  local pt = ptat[r]
  if not pt then
    local s = redis.call('ZSCORE', prkey, r)
    pt = s and tonumber(s) or now_us
  end
  local new_pt, pair_wait = gcra(pt, now_us, pair_interval, pair_burst)
  if not new_pt then
    refuse(7, now + pair_wait)
  end
  local new_tat, wait = gcra(tat, now_us, interval, burst)
  if not new_tat then
    refuse(6, now + wait)
  end
  if refused then
    if never then
      return refused
    end
    return refused, -1, passes_at - now
  end

  -- Admitted: consume everywhere at once.
  tat, tat_changed = new_tat, true
  ptat[r] = new_pt
  if marketing then
    local times = marketing_times(r)
    times[#times + 1] = now
    mtimes[r] = times
  end
  if sw then
    return 3, sw
  end
  if cur then
    local m = meta_of(r)
    if rolling and cur < now + slot_ms then
      cur = now + slot_ms
      set_slot(r, cur)
      if at_portfolio then
        set_sender_slot(m[3], r, cur)
      end
    end
    m[2] = '1'
    metas[r] = m
    return 2, cur
  end
  seq = (seq or tonumber(redis.call('GET', seqkey) or '0')) + 1
  local resv = fmt(now) .. '.' .. fmt(seq)
  local until_ms = now + slot_ms
  set_slot(r, until_ms)
  if at_portfolio then
    set_sender_slot(sender, r, until_ms)
  end
  local prev = ''
  if not uniques[r] then
    prev = redis.call('ZSCORE', uqkey, r) or ''
  else
    prev = metas[r] and metas[r][4] or ''
  end
  metas[r] = { resv, '0', sender, prev }
  uniques[r] = true
  used = used + 1
  held = held + 1
  return 1, until_ms, -1, resv
end

local out = { now, limit, W.tier, effective }
for i = 16, #ARGV do
  local decision, expires, retry, resv = decide(ARGV[i])
  out[#out + 1] = decision
  out[#out + 1] = expires or -1
  out[#out + 1] = retry or -1
  out[#out + 1] = used
  -- A dry run opens nothing, so it hands out no reservation.
  out[#out + 1] = (not dry and resv) or ''
end

if dry then
  return out
end

if nmoved > 0 then
  local z = {}
  for r, e in pairs(moved) do
    z[#z + 1] = fmt(e)
    z[#z + 1] = r
  end
  chunked('ZADD', win, z, 512)
end
if next(metas) ~= nil then
  local h = {}
  for r, m in pairs(metas) do
    h[#h + 1] = r
    h[#h + 1] = join_meta(m[1], m[2], m[3], m[4])
  end
  chunked('HSET', meta, h, 512)
end
if seq then
  redis.call('SET', seqkey, fmt(seq))
end
if nmoved > 0 or seq then
  local until_ms = latest(win, now)
  keep(win, until_ms, now, slack)
  keep(meta, until_ms, now, slack)
  keep(seqkey, until_ms, now, slack)
end
for opener, entries in pairs(wsmoved) do
  local key = ws_prefix .. opener
  local z = {}
  for r, e in pairs(entries) do
    z[#z + 1] = fmt(e)
    z[#z + 1] = r
  end
  redis.call('ZREMRANGEBYSCORE', key, '-inf', fmt(now))
  chunked('ZADD', key, z, 512)
  keep(key, latest(key, now), now, slack)
end
if tat_changed then
  redis.call('SET', tpkey, fmt(tat))
  keep(tpkey, math.ceil(tat / 1000), now, slack)
end
if next(ptat) ~= nil then
  local z, last = {}, 0
  for r, t in pairs(ptat) do
    z[#z + 1] = fmt(t)
    z[#z + 1] = r
  end
  redis.call('ZREMRANGEBYSCORE', prkey, '-inf', fmt(now_us))
  chunked('ZADD', prkey, z, 512)
  keep(prkey, math.ceil(latest(prkey, now_us) / 1000), now, slack)
end
if next(mtimes) ~= nil then
  local h = {}
  for r, times in pairs(mtimes) do
    local parts = {}
    for _, t in ipairs(times) do
      parts[#parts + 1] = fmt(t)
    end
    h[#h + 1] = r
    h[#h + 1] = table.concat(parts, ',')
  end
  chunked('HSET', mkkey, h, 512)
  keep(mkkey, now + mper, now, slack)
end
if next(uniques) ~= nil then
  local z = {}
  for r in pairs(uniques) do
    z[#z + 1] = fmt(now)
    z[#z + 1] = r
  end
  redis.call('ZREMRANGEBYSCORE', uqkey, '-inf', fmt(now - MONTH_MS))
  chunked('ZADD', uqkey, z, 512)
  keep(uqkey, now + MONTH_MS, now, slack)
  -- Project an upgrade the first time the trailing count reaches the bar (PRODUCT.md §1.3).
  local pending = W.up_at and W.up_from == W.tier
  if not pending and eligible(W) and TIER_NEXT[W.rules][W.tier] then
    local u7 = redis.call('ZCOUNT', uqkey, '(' .. fmt(now - WEEK_MS), '+inf')
    local u30 = redis.call('ZCARD', uqkey)
    if upgrade_threshold_met(W.rules, W.tier, u7, u30) then
      redis.call('HSET', wpolkey, 'up_at', fmt(now + UPGRADE_DELAY_MS[W.rules]), 'up_from', W.tier)
    end
  end
end
return out
