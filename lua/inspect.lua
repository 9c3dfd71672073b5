-- inspect.lua: a read-only view of a target's deciding window, for operators.
--
-- KEYS[1] window         zset   recipient -> slot expiry (ms)
-- KEYS[2] window policy  hash   limit, tier, mode, custom
-- KEYS[3] residency      sender target: the "away" string or members set of its home;
--                        portfolio target: its members set
-- ARGV[1] now (ms), or "" for Redis TIME
-- ARGV[2] home kind "s" | "p"
-- ARGV[3] sender, or "" when the target is the portfolio itself
-- ARGV[4] recipient, or ""
-- ARGV[5] default limit, ARGV[6] default tier, ARGV[7] default mode
-- ARGV[8] prefix of this home's service-window keys ("<prefix>:{<home>}:csw:")
-- The service-window keys of a portfolio's members are built here from ARGV[8]; they share the
-- home's hash tag, so they live in the same cluster slot as KEYS.
-- Returns {"moved", portfolio|""}, or {now, limit, tier, mode, custom, used, next_free|-1,
-- freeing_next_hour, open_service_windows, counted_until|-1, service_window_until|-1, members...}

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
local win = KEYS[1]
local pol = redis.call('HMGET', KEYS[2], 'limit', 'tier', 'mode', 'custom')
local live = '(' .. fmt(now)
local used = redis.call('ZCOUNT', win, live, '+inf')
local first = redis.call('ZRANGEBYSCORE', win, live, '+inf', 'WITHSCORES', 'LIMIT', 0, 1)
local next_free = first[2] and tonumber(first[2]) or -1
local hour = redis.call('ZCOUNT', win, live, fmt(now + 3600000))
local open, sw_until = 0, -1
for _, s in ipairs(senders) do
  local key = ARGV[8] .. s
  open = open + redis.call('ZCOUNT', key, live, '+inf')
  if r ~= '' then
    local e = redis.call('ZSCORE', key, r)
    e = e and tonumber(e)
    if e and e > now and e > sw_until then
      sw_until = e
    end
  end
end
local counted = -1
if r ~= '' then
  local e = redis.call('ZSCORE', win, r)
  e = e and tonumber(e)
  if e and e > now then
    counted = e
  end
end
local out = {
  now, tonumber(pol[1] or ARGV[5]), pol[2] or ARGV[6], pol[3] or ARGV[7], tonumber(pol[4] or '0'),
  used, next_free, hour, open, counted, sw_until,
}
if sender == '' then
  for _, s in ipairs(senders) do
    out[#out + 1] = s
  end
end
return out
