-- policy.lua: stores a sender's own policy where its state lives (its own home, or its
-- portfolio's while assigned), so the decision script reads it in the same slot.
--
-- KEYS[1] sender policy  hash   limit, tier, mode, custom
-- KEYS[2] residency      sender home: its "away" string; portfolio home: its members set
-- ARGV[1] home kind "s" | "p"
-- ARGV[2] sender
-- ARGV[3] limit, ARGV[4] tier, ARGV[5] mode, ARGV[6] custom
-- Returns {"moved", portfolio|""}, or {1}.

local ok, where = resident(ARGV[1], KEYS[2], ARGV[2])
if not ok then
  return { 'moved', where }
end
redis.call('HSET', KEYS[1], 'limit', ARGV[3], 'tier', ARGV[4], 'mode', ARGV[5], 'custom', ARGV[6])
return { 1 }
