-- confirm.lua: the message of a reservation was delivered. The slot's clock starts at delivery:
-- it then lasts until delivery + 24 h, never less than it already did. The delivery time is
-- clamped to [the reservation's time, now].
--
-- KEYS[1] window header hash   the sharded window (lib.lua, win_open)
-- KEYS[2] window index  zset   shard -> its earliest slot expiry (ms)
-- KEYS[3] residency    sender home: its "away" string; portfolio home: its members set
-- ARGV[1] now (ms), or "" for Redis TIME
-- ARGV[2] home kind "s" | "p"
-- ARGV[3] sender
-- ARGV[4] recipient
-- ARGV[5] reservation, stored form "<opened_at>.<seq>"
-- ARGV[6] delivered at (ms)
-- ARGV[7] slot length (ms), ARGV[8] TTL slack (ms)
-- ARGV[9] prefix of the per-sender slot indexes at a portfolio home, "" at a sender home
-- Returns {"moved", portfolio|""}, or {1, expires_at}, or {0} when no live slot has that reservation.

local now = clock(ARGV[1])
local ok, where = resident(ARGV[2], KEYS[3], ARGV[3])
if not ok then
  return { 'moved', where }
end
local win, r, resv = win_open(KEYS[1], KEYS[2]), ARGV[4], ARGV[5]
local s = win_expiry(win, r)
local v = win_value(win, r)
local dot = string.find(resv, '.', 1, true)
if not s or s <= now or not v or not dot then
  return { 0 }
end
-- The slot is identified by its sequence; the reservation time comes from the token.
local seq, _, prev, opener = slot_split(v)
if seq ~= win_rel_seq(win, string.sub(resv, dot + 1)) then
  return { 0 }
end
local opened = tonumber(string.sub(resv, 1, dot - 1))
-- mirrors rules::decide::confirmed_until
local delivered = math.min(math.max(tonumber(ARGV[6]), opened), now)
local until_ms = math.max(s, delivered + tonumber(ARGV[7]))
local slack = tonumber(ARGV[8])
-- A confirmation is a delivery: the slot is touched, so no reservation can release it any more.
win_write(win, { [r] = until_ms }, { [r] = true }, { [r] = slot_join(seq, '1', prev, opener) })
win_save(win, now, slack)
if ARGV[9] ~= '' then
  local ws = ARGV[9] .. opener
  redis.call('ZADD', ws, fmt(until_ms), r)
  keep(ws, latest(ws, now), now, slack)
end
return { 1, until_ms }
