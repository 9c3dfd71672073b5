-- inbound.lua: the recipient wrote to the sender: opens or restarts their customer service
-- window (24 h, or 72 h for a free entry point), never shortening one that lasts longer.
--
-- KEYS[1] service    zset   recipient -> service window expiry (ms), of this sender
-- KEYS[2] residency  sender home: its "away" string; portfolio home: its members set
-- ARGV[1] now (ms), or "" for Redis TIME
-- ARGV[2] home kind "s" | "p"
-- ARGV[3] sender
-- ARGV[4] recipient
-- ARGV[5] window length (ms)
-- ARGV[6] TTL slack (ms)
-- Returns {"moved", portfolio|""}, or {1, service window expiry}.

local now = clock(ARGV[1])
local ok, where = resident(ARGV[2], KEYS[2], ARGV[3])
if not ok then
  return { 'moved', where }
end
local key, r = KEYS[1], ARGV[4]
redis.call('ZREMRANGEBYSCORE', key, '-inf', fmt(now))
local until_ms = now + tonumber(ARGV[5])
local cur = redis.call('ZSCORE', key, r)
if cur and tonumber(cur) > until_ms then
  until_ms = tonumber(cur)
end
redis.call('ZADD', key, fmt(until_ms), r)
keep(key, latest(key, now), now, tonumber(ARGV[6]))
return { 1, until_ms }
