-- move_in.lua: the new home's side of assigning a sender to another home. Restores its
-- sender-scoped keys here and marks it as living here. When it already lives here (a resumed
-- move whose import had completed), nothing is restored: what is here is newer.
--
-- KEYS[1]  residency at the new home: the sender's "away" string, or the portfolio's members set
-- KEYS[2..] the sender-scoped keys at the new home, in the order move_out returned them
-- ARGV[1] new home kind "s" | "p"
-- ARGV[2] sender
-- ARGV[3..] per key: payload ("" = absent), pttl; then the same per further part of the split
--           sets among them (lib.lua, sset_further_parts)
-- Returns {1} when imported, {0} when it already lived here.

local here
if ARGV[1] == 's' then
  here = redis.call('EXISTS', KEYS[1]) == 0
else
  here = redis.call('SISMEMBER', KEYS[1], ARGV[2]) == 1
end
if here then
  return { 0 }
end
local function restore(key, payload, ttl)
  ttl = tonumber(ttl)
  if payload ~= '' and ttl ~= -2 then
    if ttl == -1 then
      ttl = 0
    end
    redis.call('RESTORE', key, ttl, payload, 'REPLACE')
  elseif payload == '' then
    redis.call('DEL', key)
  end
end
for i = 2, #KEYS do
  restore(KEYS[i], ARGV[2 * i - 1], ARGV[2 * i])
end
-- Then the further parts of the split sets, in move_out's order: each restored part 0 says how
-- many parts follow it.
local a = 2 * #KEYS + 1
for _, k in ipairs(sset_further_parts({ unpack(KEYS, 2) })) do
  restore(k, ARGV[a] or '', ARGV[a + 1] or '-2')
  a = a + 2
end
if ARGV[1] == 's' then
  redis.call('DEL', KEYS[1])
else
  redis.call('SADD', KEYS[1], ARGV[2])
end
return { 1 }
