-- list.lua: one page of a window's live slots in listing order (win_pos, then recipient bytes),
-- strictly after a cursor. In that order each shard is one contiguous range, so a page reads
-- only the shards it lists, plus at most a scan budget of shards holding nothing live: its work
-- is bounded by the page size, whatever the window holds (docs/contract.md, "Listing a window").
--
-- KEYS[1] window header hash   the sharded window (lib.lua, win_open)
-- KEYS[2] window index  zset   shard -> its earliest slot expiry (ms)
-- KEYS[3] residency    sender home: its "away" string; portfolio home: its members set
-- ARGV[1] now (ms), or "" for Redis TIME
-- ARGV[2] home kind "s" | "p"
-- ARGV[3] sender, or "" when the target is the portfolio itself
-- ARGV[4] page size
-- ARGV[5] cursor position (0 .. 2^32-1) or "" from the start, ARGV[6] cursor recipient or ""
-- ARGV[7] "" to list; or count mode (Inspect's slots_freeing_next_hour on a large window): the
--         expiry (ms) to count live slots up to, ARGV[4] then being the shards to count over
-- Returns {"moved", portfolio|""}, or {next position|-1, next recipient, expires_at, recipient,
-- sender, ...}: -1 when the listing is complete; the page may be short (even empty) when the
-- scan budget ran out first. In count mode: {next position|-1, count}.

local now = clock(ARGV[1])
if ARGV[3] ~= '' then
  local ok, where = resident(ARGV[2], KEYS[3], ARGV[3])
  if not ok then
    return { 'moved', where }
  end
end
local win, want = win_open(KEYS[1], KEYS[2]), tonumber(ARGV[4])
if ARGV[7] ~= '' then
  local c, nxt = win_count_from(win, tonumber(ARGV[5]), tonumber(ARGV[7]), now, want)
  return { fmt(nxt), c }
end
local END = 2 ^ 32
local pos, after = 0, ''
if ARGV[5] ~= '' then
  pos, after = tonumber(ARGV[5]), ARGV[6]
end
local budget = 8 + math.ceil(want / 8)
local out = { -1, '' }
local taken = 0
while pos < END and budget > 0 do
  budget = budget - 1
  local i, bits = win_shard_of(win, rev32(pos))
  local stop = rev32(i) + 2 ^ (32 - bits)
  local rows = {}
  local live = redis.call('ZRANGEBYSCORE', win.zp .. i, '(' .. fmt(now), '+inf', 'WITHSCORES')
  for j = 1, #live, 2 do
    local r = live[j]
    local p = win_pos(r)
    if p > pos or (p == pos and bytes_gt(r, after)) then
      rows[#rows + 1] = { p, r, live[j + 1] }
    end
  end
  table.sort(rows, function(x, y)
    if x[1] ~= y[1] then
      return x[1] < y[1]
    end
    return bytes_gt(y[2], x[2])
  end)
  local n = math.min(#rows, want - taken)
  if n > 0 then
    local names = {}
    for j = 1, n do
      names[j] = rows[j][2]
    end
    local vals = redis.call('HMGET', win.mp .. i, unpack(names))
    for j = 1, n do
      local opener = ''
      if vals[j] then
        local _, _, _, o = slot_split(vals[j])
        opener = o
      end
      if opener == '' then
        opener = ARGV[3]
      end
      out[#out + 1] = rows[j][3]
      out[#out + 1] = rows[j][2]
      out[#out + 1] = opener
    end
    taken = taken + n
  end
  if n < #rows then
    -- The page is full inside this shard: the next one starts after its last entry.
    pos, after = rows[n][1], rows[n][2]
    break
  end
  pos, after = stop, ''
  if taken >= want then
    break
  end
end
if pos < END then
  out[1], out[2] = fmt(pos), after
end
return out
