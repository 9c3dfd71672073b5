-- reset.lua: clears a target's window (its slots, their metadata, and at a portfolio home the
-- per-sender slot indexes). The reservation sequence is kept, so tokens issued before the reset
-- can never match a slot opened after it. Service windows, rates and projections are kept.
--
-- KEYS[1] window header hash   the sharded window (lib.lua, win_open); its sequence is kept
-- KEYS[2] window index  zset   shard -> its earliest slot expiry
-- KEYS[3] residency    sender home: its "away" string; portfolio home: its members set
-- ARGV[1] home kind "s" | "p"
-- ARGV[2] sender, or "" for a portfolio
-- ARGV[3] prefix of the per-sender slot indexes ("" at a sender home)
-- Returns {"moved", portfolio} when the sender is assigned to a portfolio, or {1}.

local win = win_open(KEYS[1], KEYS[2])
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
  for i = 0, win_shards(win) - 1 do
    for _, v in ipairs(redis.call('HVALS', win.mp .. i)) do
      local _, _, _, opener = slot_split(v)
      openers[opener] = true
    end
  end
  for s in pairs(openers) do
    redis.call('DEL', ARGV[3] .. s)
  end
end
for i = 0, win_shards(win) - 1 do
  redis.call('DEL', win.zp .. i, win.mp .. i)
end
redis.call('DEL', KEYS[2])
if redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('HSET', KEYS[1], 'n', '0', 'lvl', '0', 'sp', '0')
end
return { 1 }
