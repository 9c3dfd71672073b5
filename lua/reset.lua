-- reset.lua: clears a target's window (its slots, their metadata, and at a portfolio home the
-- per-sender slot indexes). The reservation sequence is kept, so tokens issued before the reset
-- can never match a slot opened after it. Service windows, rates and projections are kept.
--
-- KEYS[1] window       zset
-- KEYS[2] window meta  hash
-- KEYS[3] residency    sender home: its "away" string; portfolio home: its members set
-- ARGV[1] home kind "s" | "p"
-- ARGV[2] sender, or "" for a portfolio
-- ARGV[3] prefix of the per-sender slot indexes ("" at a sender home)
-- Returns {"moved", portfolio} when the sender is assigned to a portfolio, or {1}.

if ARGV[1] == 's' then
  local ok, where = resident('s', KEYS[3], ARGV[2])
  if not ok then
    return { 'moved', where }
  end
else
  -- Every opener's index: current members, and senders that opened slots and left since.
  local openers = {}
  for _, s in ipairs(redis.call('SMEMBERS', KEYS[3])) do
    openers[s] = true
  end
  for _, m in ipairs(redis.call('HVALS', KEYS[2])) do
    local _, _, opener = split_meta(m)
    openers[opener] = true
  end
  for s in pairs(openers) do
    redis.call('DEL', ARGV[3] .. s)
  end
end
redis.call('DEL', KEYS[1], KEYS[2])
return { 1 }
