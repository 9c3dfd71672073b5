-- list.lua: one page of a window's live slots, by expiry then recipient (bytes), strictly after
-- a cursor, so pages neither repeat nor skip even when many slots share one expiry.
--
-- KEYS[1] window header hash   the sharded window (lib.lua, win_open)
-- KEYS[2] window index  zset   shard -> its earliest slot expiry (ms)
-- KEYS[3] residency    sender home: its "away" string; portfolio home: its members set
-- ARGV[1] now (ms), or "" for Redis TIME
-- ARGV[2] home kind "s" | "p"
-- ARGV[3] sender, or "" when the target is the portfolio itself
-- ARGV[4] page size + 1 (one more than returned, to know whether a next page exists)
-- ARGV[5] cursor expiry (ms) or "", ARGV[6] cursor recipient
-- Every shard contributes its first page after the cursor; the merge keeps the first `want`.
-- Returns {"moved", portfolio|""}, or {expires_at, recipient, sender, ...}.

local now = clock(ARGV[1])
if ARGV[3] ~= '' then
  local ok, where = resident(ARGV[2], KEYS[3], ARGV[3])
  if not ok then
    return { 'moved', where }
  end
end
local win, want = win_open(KEYS[1], KEYS[2]), tonumber(ARGV[4])
local rows = {}
local c
if ARGV[5] ~= '' and tonumber(ARGV[5]) > now then
  c = tonumber(ARGV[5])
end
for _, i in ipairs(redis.call('ZRANGE', KEYS[2], 0, -1)) do
  local key, got = win.zp .. i, 0
  local from = '(' .. fmt(now)
  if c then
    -- Slots sharing the cursor's expiry, after the cursor's recipient.
    for _, m in ipairs(redis.call('ZRANGEBYSCORE', key, fmt(c), fmt(c))) do
      if got < want and bytes_gt(m, ARGV[6]) then
        rows[#rows + 1] = { c, m, i }
        got = got + 1
      end
    end
    from = '(' .. fmt(c)
  end
  if got < want then
    local more = redis.call('ZRANGEBYSCORE', key, from, '+inf', 'WITHSCORES', 'LIMIT', 0, want - got)
    for j = 1, #more, 2 do
      rows[#rows + 1] = { tonumber(more[j + 1]), more[j], i }
    end
  end
end
table.sort(rows, function(x, y)
  if x[1] ~= y[1] then
    return x[1] < y[1]
  end
  return bytes_gt(y[2], x[2])
end)
local out = {}
for j = 1, math.min(#rows, want) do
  local row = rows[j]
  local v = redis.call('HGET', win.mp .. row[3], row[2])
  local opener = ''
  if v then
    local _, _, _, o = slot_split(v)
    opener = o
  end
  if opener == '' then
    opener = ARGV[3]
  end
  out[#out + 1] = row[1]
  out[#out + 1] = row[2]
  out[#out + 1] = opener
end
return out
