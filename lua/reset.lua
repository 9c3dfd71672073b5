-- reset.lua: clears a target's window in chunks, so that no call blocks Redis for long however
-- large the window (docs/contract.md, "Reset"). "begin" sets a watermark, the window's last
-- reservation sequence: every slot opened up to it is to go. Each "sweep" then removes those
-- slots from the next SWEEP shards (their entries, values and, at a portfolio home, the
-- opener's per-sender slot index), keeping the live count exact, until every shard is done.
-- Slots opened after the watermark stay. While a sweep is under way no shard is merged
-- (lib.lua, win_rebalance), so no old slot can move behind it; splits only move slots to
-- higher shards, which it has not reached. The reservation sequence is kept, so a token issued
-- before the reset can never match a slot opened after it. Service windows, rates and
-- projections are kept.
--
-- KEYS[1] window header hash   the sharded window (lib.lua, win_open): rw (watermark) and rp
--                              (next shard to sweep) while a reset is under way
-- KEYS[2] window index  zset   shard -> its earliest slot expiry
-- KEYS[3] residency    sender home: its "away" string; portfolio home: its members set
-- ARGV[1] home kind "s" | "p"
-- ARGV[2] sender, or "" for a portfolio
-- ARGV[3] prefix of the per-sender slot indexes ("" at a sender home)
-- ARGV[4] "begin" | "sweep"
-- ARGV[5] shards per sweep
-- Returns {"moved", portfolio} when the sender is assigned to a portfolio, or {shards left}.

local win = win_open(KEYS[1], KEYS[2])
if ARGV[1] == 's' then
  local ok, where = resident('s', KEYS[3], ARGV[2])
  if not ok then
    return { 'moved', where }
  end
end
if redis.call('EXISTS', KEYS[1]) == 0 then
  return { 0 }
end
if ARGV[4] == 'begin' then
  redis.call('HSET', KEYS[1], 'rw', fmt(win.seq), 'rp', '0')
  return { win_shards(win) }
end
local f = redis.call('HMGET', KEYS[1], 'rw', 'rp')
if not f[1] then
  return { 0 }
end
local mark, i = tonumber(f[1]), tonumber(f[2])
local last = math.min(i + tonumber(ARGV[5]), win_shards(win)) - 1
for s = i, last do
  local flat = redis.call('HGETALL', win.mp .. s)
  local gone, by_opener = {}, {}
  for j = 1, #flat, 2 do
    local seq, _, _, opener = slot_split(flat[j + 1])
    if tonumber(seq) + win.sb <= mark then
      gone[#gone + 1] = flat[j]
      if opener ~= '' then
        local t = by_opener[opener] or {}
        by_opener[opener] = t
        t[#t + 1] = flat[j]
      end
    end
  end
  if #gone > 0 then
    win_drop(win, s, gone)
    for opener, rs in pairs(by_opener) do
      chunked('ZREM', ARGV[3] .. opener, rs, 512)
    end
    win_reindex(win, s)
  end
end
local left = win_shards(win) - (last + 1)
if left > 0 then
  redis.call('HSET', KEYS[1], 'n', fmt(win.n), 'rp', fmt(last + 1))
  return { left }
end
redis.call('HDEL', KEYS[1], 'rw', 'rp')
if win.n == 0 then
  -- Every shard is empty (Redis deleted the keys): the window starts again from one shard.
  redis.call('DEL', KEYS[2])
  redis.call('HSET', KEYS[1], 'n', '0', 'lvl', '0', 'sp', '0')
else
  redis.call('HSET', KEYS[1], 'n', fmt(win.n))
end
return { 0 }
