-- inspect.lua: a read-only view of a target's deciding window, for operators. Tier changes due
-- under auto_tier are shown as applied, without being written.
--
-- KEYS[1] window header  hash   the sharded window (lib.lua, win_open)
-- KEYS[2] window policy  hash   the home's policy
-- KEYS[3] residency      sender target: the "away" string or members set of its home;
--                        portfolio target: its members set
-- KEYS[4] uniques        zset   the projection index (lib.lua, ut_open)
-- KEYS[5] sender policy  hash   the sender's own policy (portfolio target: = KEYS[2])
-- KEYS[6] window index   zset   shard -> its earliest slot expiry (ms)
-- ARGV[1] now (ms), or "" for Redis TIME
-- ARGV[2] home kind "s" | "p"
-- ARGV[3] sender, or "" when the target is the portfolio itself
-- ARGV[4] recipient, or ""
-- ARGV[5..7] the home's default tier, mode, rule set
-- ARGV[8..10] the sender's default tier, mode, rule set
-- ARGV[11] prefix of this home's service-window keys ("<prefix>:{<home>}:csw:")
-- The service-window keys of a portfolio's members are built here from ARGV[11]; they share the
-- home's hash tag, so they live in the same cluster slot as KEYS.
-- Returns {"moved", portfolio|""}, or {now, used, next_free|-1, freeing_next_hour,
-- open_service_windows, counted_until|-1, service_window_until|-1, unique_7d, unique_30d,
-- limit, effective, next_tier|"", upgrade_at|-1, downgrade_at|-1, hour_next (-1, or the listing
-- position from which list.lua counts the rest of freeing_next_hour), known (1|0),
-- <14 window policy fields>,
-- <14 sender policy fields, or none for a portfolio target>, then for a portfolio: its members}

-- Shards whose slots one call counts for slots_freeing_next_hour (about 3,000 slots).
local INSPECT_SHARDS = 64

local now = clock(ARGV[1])
local sender, r = ARGV[3], ARGV[4]
local senders
if sender ~= '' then
  local ok, where = resident(ARGV[2], KEYS[3], sender)
  if not ok then
    return { 'moved', where }
  end
  senders = { sender }
else
  senders = redis.call('SMEMBERS', KEYS[3])
end
local win = win_open(KEYS[1], KEYS[6])
local W = read_policy(KEYS[2], ARGV[5], ARGV[6], ARGV[7])
settle(W, KEYS[2], now, false)
local live = '(' .. fmt(now)
local used = win_used(win, now)
local next_free = win_kth(win, {}, 0, now) or -1
-- Slots freeing within the hour: in the shards whose earliest slot frees by then, when they are
-- few; otherwise counted over a budget of shards here and the rest by list.lua, a chunk per
-- call, so that no call's work grows with the window.
local hour, hour_next, hour_end = 0, -1, now + 3600000
if redis.call('ZCOUNT', KEYS[6], '-inf', fmt(hour_end)) <= INSPECT_SHARDS then
  for _, i in ipairs(redis.call('ZRANGEBYSCORE', KEYS[6], '-inf', fmt(hour_end))) do
    hour = hour + redis.call('ZCOUNT', win.zp .. i, live, fmt(hour_end))
  end
else
  hour, hour_next = win_count_from(win, 0, hour_end, now, INSPECT_SHARDS)
end
local open, sw_until = 0, -1
for _, s in ipairs(senders) do
  local key = ARGV[11] .. s
  open = open + sset_count_after(key, now)
  if r ~= '' then
    local e = sset_score(key, r)
    if e and e > now and e > sw_until then
      sw_until = e
    end
  end
end
local counted = -1
if r ~= '' then
  local e = win_expiry(win, r)
  if e and e > now then
    counted = e
  end
end
-- The cursors moved to now in this call only (a read writes nothing back).
local uq = ut_open(KEYS[4], now)
ut_seek_all(uq, now)
local u7, u30 = uq.cur[1].a, uq.cur[2].a
-- mirrors rules::settle::projection
local next_tier, up, down = '', -1, -1
if W.up_at and W.up_from == W.tier and eligible(W) and TIER_NEXT[W.rules][W.tier] then
  next_tier, up = TIER_NEXT[W.rules][W.tier], W.up_at
end
if W.rules == 'legacy' and W.status == 'flagged' and W.flagged and TIER_PREV[W.tier] then
  down = W.flagged + FLAGGED_DOWNGRADE_MS
  if next_tier == '' then
    next_tier = TIER_PREV[W.tier]
  end
end
-- Known: the ledger holds something of the target (docs/contract.md, "Inspecting a target").
local known = used > 0 or u30 > 0 or open > 0 or redis.call('EXISTS', KEYS[2]) == 1
if sender ~= '' then
  known = known or ARGV[2] == 'p' or redis.call('EXISTS', KEYS[5]) == 1
else
  known = known or #senders > 0
end
local out = { now, used, next_free, hour, open, counted, sw_until, u7, u30, limit_of(W), effective_of(W), next_tier, up, down,
  fmt(hour_next), known and 1 or 0 }
policy_out(W, out)
if sender ~= '' then
  if ARGV[2] == 's' then
    policy_out(W, out)
  else
    policy_out(read_policy(KEYS[5], ARGV[8], ARGV[9], ARGV[10]), out)
  end
else
  for _, s in ipairs(senders) do
    out[#out + 1] = s
  end
end
return out
