-- release.lua: frees the slot a reservation opened (the send failed), only while that slot is
-- live and no later counted delivery has touched it. Idempotent: a second call finds nothing.
--
-- KEYS[1] window       zset   recipient -> slot expiry (ms)
-- KEYS[2] window meta  hash   recipient -> "<reservation>|<opening sender>"
-- KEYS[3] residency    sender home: its "away" string; portfolio home: its members set
-- ARGV[1] now (ms), or "" for Redis TIME
-- ARGV[2] home kind "s" | "p"
-- ARGV[3] sender
-- ARGV[4] recipient
-- ARGV[5] reservation, stored form "<opened_at>.<seq>"
-- Returns {"moved", portfolio|""}, or {1} when released, {0} when there was nothing to free.

local now = clock(ARGV[1])
local ok, where = resident(ARGV[2], KEYS[3], ARGV[3])
if not ok then
  return { 'moved', where }
end
local r = ARGV[4]
local s = redis.call('ZSCORE', KEYS[1], r)
if not s or tonumber(s) <= now then
  return { 0 }
end
local m = redis.call('HGET', KEYS[2], r)
if m and string.sub(m, 1, #ARGV[5] + 1) == ARGV[5] .. '|' then
  redis.call('ZREM', KEYS[1], r)
  redis.call('HDEL', KEYS[2], r)
  return { 1 }
end
return { 0 }
