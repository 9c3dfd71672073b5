-- policy.lua: stores a policy. A sender's own policy lives where its state lives (its own home,
-- or its portfolio's while assigned), so the decision script reads it in the same slot. Setting
-- status FLAGGED starts the legacy downgrade clock ("flagged"), kept while it stays flagged.
--
-- KEYS[1] policy     hash   the sender's own policy, or the portfolio's
-- KEYS[2] residency  sender home: its "away" string; portfolio home: its members set
-- ARGV[1] home kind "s" | "p"
-- ARGV[2] sender, or "" for a portfolio's policy (no residency check)
-- ARGV[3] now (ms), or "" for Redis TIME
-- ARGV[4..] field, value, ... (tier, custom, mode, status, quality, mps, pint, pburst, head,
--           scap, mcap, mper, rules, auto)
-- Returns {"moved", portfolio|""}, or {1}.

if ARGV[2] ~= '' then
  local ok, where = resident(ARGV[1], KEYS[2], ARGV[2])
  if not ok then
    return { 'moved', where }
  end
end
local now = clock(ARGV[3])
local key = KEYS[1]
local old_status = redis.call('HGET', key, 'status') or 'connected'
local old_flagged = redis.call('HGET', key, 'flagged') or ''
local fields = {}
local status = 'connected'
for i = 4, #ARGV, 2 do
  fields[#fields + 1] = ARGV[i]
  fields[#fields + 1] = ARGV[i + 1]
  if ARGV[i] == 'status' then
    status = ARGV[i + 1]
  end
end
redis.call('HSET', key, unpack(fields))
-- mirrors rules::settle::flag
if status ~= 'flagged' then
  redis.call('HDEL', key, 'flagged')
elseif old_status ~= 'flagged' or old_flagged == '' then
  redis.call('HSET', key, 'flagged', fmt(now))
end
return { 1 }
