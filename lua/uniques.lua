-- uniques.lua: the projection index's users of the trailing 30 days, with when each last got a
-- new slot: what the planner starts from (docs/contract.md, "Planning").
--
-- KEYS[1] uniques  zset  the projection index's by-user set, in parts (lib.lua, ut_open)
-- ARGV[1] now (ms), or "" for Redis TIME
-- Returns {recipient, time (ms), ...}, part by part.

local now = clock(ARGV[1])
local out = {}
for i = 0, sset_parts(KEYS[1]) - 1 do
  -- The shape member scores below any time, so the range leaves it out.
  local rows = redis.call('ZRANGEBYSCORE', sset_part(KEYS[1], i), '(' .. fmt(now - MONTH_MS), '+inf', 'WITHSCORES')
  for j = 1, #rows do
    out[#out + 1] = rows[j]
  end
end
return out
