-- move_out.lua: the old home's side of assigning a sender to another home.
--   mode "out":  atomically marks the sender as no longer living here and hands over copies of
--                its sender-scoped keys (DUMP payload and PTTL); the keys stay, inert, until
--                the new home holds them, so no interruption can lose them.
--   mode "drop": after the new home holds them, deletes them here (unless the sender lives
--                here again).
--
-- KEYS[1]  residency at the old home: the sender's "away" string, or the portfolio's members set
-- KEYS[2..] the sender-scoped keys at the old home (own policy, service windows, throughput,
--           pair rates, marketing log: keys::HomeKeys::sender_scoped)
-- ARGV[1] old home kind "s" | "p"
-- ARGV[2] sender
-- ARGV[3] the portfolio it moves to ("" = its own home)
-- ARGV[4] mode "out" | "drop"
-- Returns for "out" {1, then per key: payload|nil, pttl (-2 = absent, -1 = persistent), then
-- the same for every further part of the split sets among them (lib.lua, sset_further_parts)};
-- for "drop" {1} when dropped, {0} when the sender lives here again.

local function lives_here()
  if ARGV[1] == 's' then
    return redis.call('EXISTS', KEYS[1]) == 0
  end
  return redis.call('SISMEMBER', KEYS[1], ARGV[2]) == 1
end

if ARGV[4] == 'drop' then
  if lives_here() then
    return { 0 }
  end
  for _, k in ipairs(sset_further_parts({ unpack(KEYS, 2) })) do
    redis.call('DEL', k)
  end
  for i = 2, #KEYS do
    redis.call('DEL', KEYS[i])
  end
  return { 1 }
end

if ARGV[1] == 's' then
  redis.call('SET', KEYS[1], ARGV[3])
else
  redis.call('SREM', KEYS[1], ARGV[2])
end
local out = { 1 }
local keys = { unpack(KEYS, 2) }
for _, k in ipairs(sset_further_parts(keys)) do
  keys[#keys + 1] = k
end
for _, k in ipairs(keys) do
  local ttl = redis.call('PTTL', k)
  if ttl == -2 then
    out[#out + 1] = false
  else
    out[#out + 1] = redis.call('DUMP', k)
  end
  out[#out + 1] = ttl
end
return out
