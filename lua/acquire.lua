-- acquire.lua: decides, in one atomic step, whether a sender may message each recipient now
-- (Acquire is a batch of one). Checks run in the order of docs/contract.md, "Which refusal is
-- reported" (first refusal wins):
-- sender status; service-window rules; messaging limit and sender cap; marketing cap; pair rate;
-- throughput. Everything is decided against an overlay of this batch's changes and written at
-- the end, so a refused message consumes nothing and a dry run runs the same code, writing nothing.
--
-- KEYS[1]  window header   hash   the sharded window (lib.lua, win_open); its shards share the tag
-- KEYS[2]  window index    zset   shard -> its earliest slot expiry (ms)
-- KEYS[3]  window policy   hash   the home's policy (a sender's own, or the portfolio's)
-- KEYS[4]  service         zset   recipient -> service window expiry (ms), of this sender, in
--                                 parts (lib.lua, sset_scores)
-- KEYS[5]  residency       sender home: its "away" string; portfolio home: its members set
-- KEYS[6]  sender policy   hash   the sender's own policy (= KEYS[3] at a sender home)
-- KEYS[7]  sender slots    zset   portfolio home: recipient -> expiry of the slots this sender opened
-- KEYS[8]  throughput      string the sender's GCRA theoretical arrival time (us)
-- KEYS[9]  pair rates      zset   recipient -> the pair's GCRA theoretical arrival time (us), in
--                                 parts (lib.lua, sset_write)
-- KEYS[10] marketing log   hash   recipient -> "t1,t2,..." recent marketing sends (ms)
-- KEYS[11] marketing holds zset   recipient -> hold until (ms) (WhatsApp error 131049)
-- KEYS[12] uniques         zset   recipient -> when it last got a new slot (ms), in parts, and
--                                 beside it the same times by two-hour bucket (lib.lua, ut_open):
--                                 projections
-- KEYS[13] ledger marker   string "1", or "lost <ms>" (lib.lua, ledger_check)
-- ARGV[1] now (ms), or "" for Redis TIME
-- ARGV[2] home kind: "s" (the sender's own window) or "p" (its portfolio's)
-- ARGV[3] sender
-- ARGV[4] message kind: "t" template, "f" free-form
-- ARGV[5] dry run: "1" decides without writing
-- ARGV[6] marketing: "1" when the category is marketing
-- ARGV[7..9] the home's default tier, mode, rule set
-- ARGV[10..12] default messages per second, pair interval (ms), pair burst
-- ARGV[13] slot length (ms), ARGV[14] TTL slack (ms)
-- ARGV[15] on a lost ledger: "d" deny new slots, "a" allow them
-- ARGV[16..] recipients, normalised
-- Returns {"moved", portfolio|""} when the sender's state lives at another home; otherwise
-- {now, limit, tier, effective limit, 1 when this call found the ledger lost else 0, new slots
-- refused since (ms)|-1, then per recipient: decision, expires_at|-1,
-- retry_after|-1, used, reservation|""}. Decisions as model::Decision::code (the prelude's D).

local wpolkey, service = KEYS[3], KEYS[4]
local spolkey, wskey, tpkey, prkey, mkkey, mhkey, uqkey = KEYS[6], KEYS[7], KEYS[8], KEYS[9], KEYS[10], KEYS[11], KEYS[12]
local now = clock(ARGV[1])
-- The small strings this call reads, in one command: the ledger marker, the throughput TAT and,
-- at a sender home, its "away" string (a portfolio home's residency is a set, which MGET reads
-- as nil).
local strings = redis.call('MGET', KEYS[13], tpkey, KEYS[5])
local away -- nil: not read (a portfolio home); false: absent
if ARGV[2] == 's' then
  away = strings[3]
end
local ok, where = resident(ARGV[2], KEYS[5], ARGV[3], away)
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
local lost_now, lost_since = ledger_check(KEYS[13], ARGV[15], now, slot_ms, not dry, strings[1])

local W = read_policy(wpolkey, ARGV[7], ARGV[8], ARGV[9])
settle(W, wpolkey, now, not dry)
local S = W
if at_portfolio then
  S = read_policy(spolkey, ARGV[7], ARGV[8], ARGV[9])
end
local limit, effective = limit_of(W), effective_of(W)
local rolling = W.mode == 'rolling'
-- A status ends at its status_until (docs/contract.md, "Policies"); a refusal for it retries
-- then, or never when it has no end.
-- mirrors model::Policy::status_at
local function status_at(P)
  if P.su and now >= P.su then
    return 'connected'
  end
  return P.status
end
-- mirrors rules::decide::status_retry
local function until_of(stop)
  local at = now
  for _, P in ipairs({ W, S }) do
    if stop(status_at(P)) then
      if not P.su then
        return nil
      end
      at = math.max(at, P.su)
    end
  end
  return at - now
end
-- From here to scap: mirrors rules::decide::standing (the rates: rules::rates::Rates::of).
local blocks = function(s) return BLOCKING[s] end
local restricts = function(s) return s == 'restricted' end
local blocked = BLOCKING[status_at(W)] or BLOCKING[status_at(S)]
local restricted = restricts(status_at(W)) or restricts(status_at(S))
local blocked_retry = blocked and until_of(blocks)
local restricted_retry = restricted and until_of(restricts)
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
local mper = S.mper > 0 and S.mper or DEFAULT_MARKETING_PERIOD_MS
local scap = at_portfolio and S.scap or 0
local ws_prefix = string.sub(wskey, 1, #wskey - #sender)

local win = win_open(KEYS[1], KEYS[2])
local used
if dry then
  used = win_used(win, now)
else
  win_trim(win, now)
  used = win.n
end
local live = '(' .. fmt(now)
local held = 0
if scap > 0 then
  held = redis.call('ZCOUNT', wskey, live, '+inf')
end
local tat = tonumber(strings[2] or '') or now_us

-- The overlay of this batch's changes.
local moved, nmoved = {}, 0 -- window: recipient -> new expiry
local extended = {} -- recipients whose stored slot got a later expiry
local wsmoved = {} -- per opener: recipient -> new expiry in its sender-slots index
local metas = {} -- recipient -> slot value parts {seq, touched, prev, opener} to write
local ptat = {} -- recipient -> new pair TAT
local mtimes = {} -- recipient -> marketing send times to write
local uniques = {} -- recipient -> true for users counted new in this batch
local opened = false
local tat_changed = false
local throttled = 0 -- throughput refusals so far in this batch

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

-- What decide() reads of stored state, fetched once for the whole batch (nothing is written
-- before the end, so it cannot change meanwhile): one command per key, or per window shard,
-- instead of one per recipient. Each table maps a recipient to its stored value, or nothing.
local pre_sw, pre_exp, pre_val, pre_pair, pre_uq, pre_hold = {}, {}, {}, {}, {}, {}
local pairs_shape -- the pair-rate set's shape (lib.lua, sset_scores)
local uq_shape -- the projection index's by-user set's shape
if not blocked then
  local rs = { unpack(ARGV, 16) }
  sset_scores(service, rs, pre_sw)
  local by, unseen = {}, {}
  for _, r in ipairs(rs) do
    local i = win_shard(win, r)
    by[i] = by[i] or {}
    table.insert(by[i], r)
  end
  for i, names in pairs(by) do
    zscores(win.zp .. i, names, pre_exp)
    local live = {}
    for _, r in ipairs(names) do
      if pre_exp[r] and pre_exp[r] > now then
        live[#live + 1] = r
      else
        unseen[#unseen + 1] = r
      end
    end
    if #live > 0 then
      local v = redis.call('HMGET', win.mp .. i, unpack(live))
      for j, r in ipairs(live) do
        pre_val[r] = v[j]
      end
    end
  end
  pairs_shape = sset_scores(prkey, rs, pre_pair)
  uq_shape = sset_scores(uqkey, unseen, pre_uq, true)
  if marketing then
    zscores(mhkey, rs, pre_hold)
  end
end

local function slot_of(r)
  if metas[r] then
    return metas[r]
  end
  local v = pre_val[r]
  if not v then
    return { '', '1', '', at_portfolio and sender or '' }
  end
  local a, b, c, d = slot_split(v)
  return { a, b, c, d }
end

-- With the cap check in decide(): mirrors rules::rates::marketing_cap_until
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

-- mirrors rules::decide::decide (the lost-ledger refusal is the Redis ledger's alone)
local function decide(r)
  if blocked then
    return D.denied_sender_blocked, -1, blocked_retry
  end
  local sw = pre_sw[r]
  if sw and sw <= now then
    sw = nil
  end
  local cur = moved[r] or pre_exp[r]
  if cur and cur <= now then
    cur = nil
  end
  -- A restricted sender may not start a conversation: a new user outside a service window.
  if not sw and restricted and not cur then
    return D.denied_sender_blocked, -1, restricted_retry
  end
  if not sw and free_form then
    return D.denied_outside_service_window
  end
  -- The time-bound checks, in the order of docs/contract.md, "Which refusal is reported": the
  -- first that refuses is the one reported, and retry_after is when every one of them passes
  -- (each passes from some moment on), or none when one never does (an effective limit of 0).
  local refused, passes_at, never = nil, now, false
  local function refuse(d, at)
    refused = refused or d
    if not at then
      never = true
    elseif at > passes_at then
      passes_at = at
    end
  end
  if not sw and not cur and lost_since then
    -- New slots wait for an operator's accept-loss, or one window after the loss.
    refuse(D.denied_ledger_lost, lost_since + slot_ms)
  end
  if not sw and not cur then
    local over_limit = limit > 0 and used >= effective
    local over_cap = scap > 0 and held >= scap
    if over_limit or over_cap then
      local w, c = now, now
      if over_limit then
        w = win_kth(win, moved, used - effective, now)
      end
      if over_cap then
        c = kth_live({ wskey }, wsmoved[sender] or {}, held - scap, now)
      end
      if w and c then
        refuse(D.denied_limit, math.max(w, c))
      else
        refuse(D.denied_limit, nil)
      end
    end
  end
  if marketing then
    local h = pre_hold[r]
    if h and h > now then
      refuse(D.denied_marketing_cap, h)
    end
    if mcap > 0 then
      local times = marketing_times(r)
      if #times >= mcap then
        refuse(D.denied_marketing_cap, times[#times - mcap + 1] + mper)
      end
    end
  end
  local pt = ptat[r] or pre_pair[r] or now_us
  local new_pt, pair_wait = gcra(pt, now_us, pair_interval, pair_burst)
  if not new_pt then
    refuse(D.denied_pair_rate, now + pair_wait)
  end
  -- Throughput refusals are staggered in batch order: the k-th passes when it would after the k
  -- before it (docs/contract.md, "Retrying a refusal").
  local new_tat, wait = gcra(math.max(tat, now_us) + throttled * interval, now_us, interval, burst)
  if not new_tat then
    throttled = throttled + 1
    refuse(D.denied_throughput, now + wait)
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
    -- mirrors rules::rates::note_marketing
    local times = marketing_times(r)
    times[#times + 1] = now
    mtimes[r] = times
  end
  if sw then
    return D.allowed_service_window, sw
  end
  if cur then
    local m = slot_of(r)
    if rolling and cur < now + slot_ms then
      cur = now + slot_ms
      set_slot(r, cur)
      extended[r] = true
      if at_portfolio then
        set_sender_slot(m[4], r, cur)
      end
    end
    if m[2] ~= '1' then
      m[2] = '1'
      metas[r] = m
    end
    return D.allowed_counted, cur
  end
  local seq = win_next_seq(win, now)
  opened = true
  local resv = fmt(now) .. '.' .. fmt(seq)
  local until_ms = now + slot_ms
  set_slot(r, until_ms)
  if at_portfolio then
    set_sender_slot(sender, r, until_ms)
  end
  local prev = ''
  if not uniques[r] then
    prev = pre_uq[r] or ''
  else
    prev = metas[r] and metas[r][3] or ''
  end
  metas[r] = { fmt(seq - win.sb), '0', prev, at_portfolio and sender or '' }
  uniques[r] = true
  used = used + 1
  held = held + 1
  return D.allowed_new, until_ms, -1, resv
end

local out = { now, limit, W.tier, effective, lost_now and 1 or 0, lost_since or -1 }
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

if nmoved > 0 or next(metas) ~= nil then
  local vals = {}
  for r, m in pairs(metas) do
    vals[r] = slot_join(m[1], m[2], m[3], m[4])
  end
  if opened then
    win.n, win.dirty = used, true
  end
  -- Shards split for the new count before the new slots land, so no shard overflows its
  -- compact encoding (a batch can open hundreds of slots at once).
  win_rebalance(win)
  win_write(win, moved, extended, vals)
end
win_save(win, now, slack)
for opener, entries in pairs(wsmoved) do
  local key = ws_prefix .. opener
  local z, last = {}, now
  for r, e in pairs(entries) do
    z[#z + 1] = fmt(e)
    z[#z + 1] = r
    last = math.max(last, e)
  end
  redis.call('ZREMRANGEBYSCORE', key, '-inf', fmt(now))
  chunked('ZADD', key, z, 512)
  extend(key, last, now, slack)
end
if tat_changed then
  redis.call('SET', tpkey, fmt(tat), 'PX', ttl_ms(math.ceil(tat / 1000), now, slack))
end
if next(ptat) ~= nil then
  local last = now_us
  for _, t in pairs(ptat) do
    last = math.max(last, t)
  end
  sset_write(pairs_shape, ptat, now_us, math.ceil(last / 1000), now, slack)
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
  -- The projection index (lib.lua, ut_open): each new user's previous time leaves the by-time
  -- half, and the user comes in at `now` in both halves.
  local T = ut_open(uqkey, now)
  local z, olds, n = {}, {}, 0
  for r in pairs(uniques) do
    z[r] = now
    n = n + 1
    local p = tonumber(pre_uq[r] or '')
    if p then
      olds[#olds + 1] = p
    end
  end
  ut_drop(T, olds)
  ut_add(T, now, n, now, slack)
  sset_write(uq_shape, z, now - MONTH_MS, now + MONTH_MS, now, slack, true)
  -- Project an upgrade the first time the trailing count reaches the bar (docs/contract.md,
  -- "Rule sets and tiers over time"). mirrors rules::projections::project_upgrade
  local pending = W.up_at and W.up_from == W.tier
  if not pending and eligible(W) and TIER_NEXT[W.rules][W.tier] then
    ut_seek_all(T, now)
    local u7 = T.cur[1].a
    -- The 30-day count matters only for the portfolio rules' entry tier.
    local u30 = 0
    if W.rules == 'portfolio' and W.tier == '250' then
      u30 = T.cur[2].a
    end
    if upgrade_threshold_met(W.rules, W.tier, u7, u30) then
      redis.call('HSET', wpolkey, 'up_at', fmt(now + UPGRADE_DELAY_MS[W.rules]), 'up_from', W.tier)
    end
  end
  ut_save(T, now, slack)
end
return out
