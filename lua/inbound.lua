-- inbound.lua: the recipient wrote to the sender: opens or restarts their customer service
-- window (24 h, or 72 h for a free entry point), never shortening one that lasts longer. The
-- inbound message also takes its share of the sender's throughput (WhatsApp counts both ways):
-- never refused, but it fills the burst at most.
--
-- KEYS[1] service        zset   recipient -> service window expiry (ms), of this sender, in
--                               parts (lib.lua, sset_write)
-- KEYS[2] residency      sender home: its "away" string; portfolio home: its members set
-- KEYS[3] sender policy  hash   the sender's own policy (messages per second)
-- KEYS[4] throughput     string the sender's GCRA theoretical arrival time (us)
-- ARGV[1] now (ms), or "" for Redis TIME
-- ARGV[2] home kind "s" | "p"
-- ARGV[3] sender
-- ARGV[4] recipient
-- ARGV[5] window length (ms)
-- ARGV[6] TTL slack (ms)
-- ARGV[7] default messages per second
-- Returns {"moved", portfolio|""}, or {1, service window expiry}.

local now = clock(ARGV[1])
local ok, where = resident(ARGV[2], KEYS[2], ARGV[3])
if not ok then
  return { 'moved', where }
end
local r, slack = ARGV[4], tonumber(ARGV[6])
local cur = {}
local shape = sset_scores(KEYS[1], { r }, cur)
-- mirrors rules::decide::service_until
local until_ms = now + tonumber(ARGV[5])
if cur[r] and cur[r] > until_ms then
  until_ms = cur[r]
end
sset_write(shape, { [r] = until_ms }, now, until_ms, now, slack)

local mps = tonumber(redis.call('HGET', KEYS[3], 'mps') or '0')
if mps < 1 then
  mps = tonumber(ARGV[7])
end
if mps < 1 then
  mps = 1
end
local interval = math.floor(1000000 / mps)
local now_us = now * 1000
-- mirrors rules::rates::inbound_tat
local tat = tonumber(redis.call('GET', KEYS[4]) or '') or now_us
tat = math.min(math.max(tat, now_us) + interval, now_us + mps * interval)
redis.call('SET', KEYS[4], fmt(tat), 'PX', ttl_ms(math.ceil(tat / 1000), now, slack))
return { 1, until_ms }
