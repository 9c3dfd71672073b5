-- failure.lua: WhatsApp refused a message. Releases the slot its reservation opened (as
-- release.lua: the message was not delivered), and for error 131049 (the user got too many
-- marketing messages) holds marketing to that user at this home for 24 h.
--
-- KEYS[1] window header hash   the sharded window (lib.lua, win_open)
-- KEYS[2] window index  zset   shard -> its earliest slot expiry (ms)
-- KEYS[3] residency    sender home: its "away" string; portfolio home: its members set
-- KEYS[4] uniques      zset   recipient -> when it last got a new slot (ms)
-- KEYS[5] holds        zset   recipient -> marketing held until (ms)
-- KEYS[6] window policy hash   the home's policy (a pending upgrade is re-derived on release)
-- ARGV[1] now (ms), or "" for Redis TIME
-- ARGV[2] home kind "s" | "p"
-- ARGV[3] sender
-- ARGV[4] recipient
-- ARGV[5] reservation ("" when the message opened no slot)
-- ARGV[6] prefix of the per-sender slot indexes at a portfolio home, "" at a sender home
-- ARGV[7] hold length (ms), "0" for no hold
-- ARGV[8] TTL slack (ms)
-- ARGV[9] the home's default tier, ARGV[10] its default rule set
-- Returns {"moved", portfolio|""}, or {released 1|0, hold until|-1}.

local now = clock(ARGV[1])
local ok, where = resident(ARGV[2], KEYS[3], ARGV[3])
if not ok then
  return { 'moved', where }
end
local r = ARGV[4]
local released = 0
local win = win_open(KEYS[1], KEYS[2])
if ARGV[5] ~= '' and release_slot(win, KEYS[4], ARGV[6], r, ARGV[5], now, KEYS[6], ARGV[9], ARGV[10]) then
  released = 1
  win_save(win, now, 0)
end
local hold = -1
if tonumber(ARGV[7]) > 0 then
  -- mirrors rules::decide::hold_until
  hold = now + tonumber(ARGV[7])
  local cur = redis.call('ZSCORE', KEYS[5], r)
  if cur and tonumber(cur) > hold then
    hold = tonumber(cur)
  end
  redis.call('ZREMRANGEBYSCORE', KEYS[5], '-inf', fmt(now))
  redis.call('ZADD', KEYS[5], fmt(hold), r)
  keep(KEYS[5], latest(KEYS[5], now), now, tonumber(ARGV[8]))
end
return { released, hold }
