-- move_out.lua: first half of assigning a sender to another home. Atomically marks the sender
-- as no longer living here and hands over its sender-scoped keys (DUMP payload and PTTL).
--
-- KEYS[1]  residency at the old home: the sender's "away" string, or the portfolio's members set
-- KEYS[2..] the sender-scoped keys at the old home (own policy, service windows, throughput,
--           pair rates, marketing log: keys::HomeKeys::sender_scoped)
-- ARGV[1] old home kind "s" | "p"
-- ARGV[2] sender
-- ARGV[3] the portfolio it moves to ("" = its own home)
-- Returns {moved_here (1|0), then per key: payload|nil, pttl (-2 = absent, -1 = persistent)}.

local here
if ARGV[1] == 's' then
  here = redis.call('EXISTS', KEYS[1]) == 0
  redis.call('SET', KEYS[1], ARGV[3])
else
  here = redis.call('SREM', KEYS[1], ARGV[2]) == 1
end
local out = { here and 1 or 0 }
for i = 2, #KEYS do
  local ttl = redis.call('PTTL', KEYS[i])
  if ttl == -2 then
    out[#out + 1] = false
  else
    out[#out + 1] = redis.call('DUMP', KEYS[i])
    redis.call('DEL', KEYS[i])
  end
  out[#out + 1] = ttl
end
return out
