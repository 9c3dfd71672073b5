-- move_in.lua: second half of assigning a sender to another home. Restores its sender-scoped
-- keys here and marks it as living here.
--
-- KEYS[1]  residency at the new home: the sender's "away" string, or the portfolio's members set
-- KEYS[2..] the sender-scoped keys at the new home, in the order move_out returned them
-- ARGV[1] new home kind "s" | "p"
-- ARGV[2] sender
-- ARGV[3..] per key: payload ("" = absent), pttl
-- Returns {1}.

for i = 2, #KEYS do
  local payload, ttl = ARGV[2 * i - 1], tonumber(ARGV[2 * i])
  if payload ~= '' and ttl ~= -2 then
    if ttl == -1 then
      ttl = 0
    end
    redis.call('RESTORE', KEYS[i], ttl, payload, 'REPLACE')
  end
end
if ARGV[1] == 's' then
  redis.call('DEL', KEYS[1])
else
  redis.call('SADD', KEYS[1], ARGV[2])
end
return { 1 }
