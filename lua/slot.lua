-- slot.lua: the reservation of a user's live slot, for a webhook status that carries none
-- (docs/contract.md, "The webhook bridge"): only a slot still untouched since it was opened, and
-- opened by this sender (the same rule as Release). Read-only.
--
-- KEYS[1] window header hash   the sharded window (lib.lua, win_open)
-- KEYS[2] window index  zset   shard -> its earliest slot expiry (ms)
-- KEYS[3] residency    sender home: its "away" string; portfolio home: its members set
-- ARGV[1] now (ms), or "" for Redis TIME
-- ARGV[2] home kind "s" | "p"
-- ARGV[3] sender
-- ARGV[4] recipient
-- ARGV[5] slot length (ms)
-- Returns {"moved", portfolio|""}, {1, reservation in its stored form "<opened_at>.<seq>"}, or
-- {0} when there is no such slot. An untouched slot still ends one slot length after it opened.

local now = clock(ARGV[1])
local ok, where = resident(ARGV[2], KEYS[3], ARGV[3])
if not ok then
  return { 'moved', where }
end
local win, r = win_open(KEYS[1], KEYS[2]), ARGV[4]
local e = win_expiry(win, r)
local v = win_value(win, r)
if not e or e <= now or not v then
  return { 0 }
end
local seq, touched, _, opener = slot_split(v)
if touched ~= '0' or (ARGV[2] == 'p' and opener ~= ARGV[3]) then
  return { 0 }
end
return { 1, fmt(e - tonumber(ARGV[5])) .. '.' .. fmt(tonumber(seq) + (win.sb or 0)) }
