-- list.lua: one page of a window's live slots, by expiry then recipient (bytes), strictly after
-- a cursor, so pages neither repeat nor skip even when many slots share one expiry.
--
-- KEYS[1] window       zset   recipient -> slot expiry (ms)
-- KEYS[2] window meta  hash   recipient -> "<reservation>|<touched>|<opener>|<prev unique>"
-- KEYS[3] residency    sender home: its "away" string; portfolio home: its members set
-- ARGV[1] now (ms), or "" for Redis TIME
-- ARGV[2] home kind "s" | "p"
-- ARGV[3] sender, or "" when the target is the portfolio itself
-- ARGV[4] page size + 1 (one more than returned, to know whether a next page exists)
-- ARGV[5] cursor expiry (ms) or "", ARGV[6] cursor recipient
-- Returns {"moved", portfolio|""}, or {expires_at, recipient, sender, ...}.

local now = clock(ARGV[1])
if ARGV[3] ~= '' then
  local ok, where = resident(ARGV[2], KEYS[3], ARGV[3])
  if not ok then
    return { 'moved', where }
  end
end
local win, want = KEYS[1], tonumber(ARGV[4])
local rows = {}
local from = '(' .. fmt(now)
if ARGV[5] ~= '' and tonumber(ARGV[5]) > now then
  local c = tonumber(ARGV[5])
  -- Slots sharing the cursor's expiry, after the cursor's recipient.
  local ties = redis.call('ZRANGEBYSCORE', win, fmt(c), fmt(c))
  for _, m in ipairs(ties) do
    if #rows < want * 2 and bytes_gt(m, ARGV[6]) then
      rows[#rows + 1] = m
      rows[#rows + 1] = c
    end
  end
  from = '(' .. fmt(c)
end
local need = want - #rows / 2
if need > 0 then
  local more = redis.call('ZRANGEBYSCORE', win, from, '+inf', 'WITHSCORES', 'LIMIT', 0, need)
  for j = 1, #more, 2 do
    rows[#rows + 1] = more[j]
    rows[#rows + 1] = tonumber(more[j + 1])
  end
end
local out = {}
for j = 1, #rows, 2 do
  local m = redis.call('HGET', KEYS[2], rows[j]) or '|||'
  local _, _, opener = split_meta(m)
  out[#out + 1] = rows[j + 1]
  out[#out + 1] = rows[j]
  out[#out + 1] = opener
end
return out
