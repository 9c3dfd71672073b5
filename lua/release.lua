-- release.lua: frees the slot a reservation opened (the send failed), only while that slot is
-- live and no later counted delivery has touched it. Idempotent: a second call finds nothing.
--
-- KEYS[1] window header hash   the sharded window (lib.lua, win_open)
-- KEYS[2] window index  zset   shard -> its earliest slot expiry (ms)
-- KEYS[3] residency    sender home: its "away" string; portfolio home: its members set
-- KEYS[4] uniques      zset   the projection index (lib.lua, ut_open)
-- KEYS[5] window policy hash   the home's policy (a pending upgrade is re-derived on release)
-- ARGV[1] now (ms), or "" for Redis TIME
-- ARGV[2] home kind "s" | "p"
-- ARGV[3] sender
-- ARGV[4] recipient
-- ARGV[5] reservation, stored form "<opened_at>.<seq>"
-- ARGV[6] prefix of the per-sender slot indexes at a portfolio home, "" at a sender home
-- ARGV[7] the home's default tier, ARGV[8] its default rule set
-- Returns {"moved", portfolio|""}, or {1} when released, {0} when there was nothing to free.

local now = clock(ARGV[1])
local ok, where = resident(ARGV[2], KEYS[3], ARGV[3])
if not ok then
  return { 'moved', where }
end
local win = win_open(KEYS[1], KEYS[2])
if release_slot(win, KEYS[4], ARGV[6], ARGV[4], ARGV[5], now, KEYS[5], ARGV[7], ARGV[8]) then
  win_save(win, now, 0)
  return { 1 }
end
return { 0 }
