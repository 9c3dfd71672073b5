-- acquire.lua: decides, in one atomic step, whether a sender may message each recipient now
-- (Acquire is a batch of one). Decide first against an overlay of this batch's changes, then
-- write, so a dry run runs the very same decision code and writes nothing.
--
-- KEYS[1] window         zset   recipient -> slot expiry (ms)
-- KEYS[2] window meta    hash   recipient -> "<reservation>|<opening sender>"; the reservation
--                               part is emptied once a later counted delivery touches the slot
-- KEYS[3] sequence       string reservation counter of this window
-- KEYS[4] window policy  hash   limit, tier, mode (missing: the defaults in ARGV)
-- KEYS[5] service        zset   recipient -> service window expiry (ms), of this sender
-- KEYS[6] residency      sender home: its "away" string; portfolio home: its members set
-- ARGV[1] now (ms), or "" for Redis TIME
-- ARGV[2] home kind: "s" (the sender's own window) or "p" (its portfolio's)
-- ARGV[3] sender
-- ARGV[4] message kind: "t" template, "f" free-form
-- ARGV[5] dry run: "1" decides without writing
-- ARGV[6] default limit, ARGV[7] default tier, ARGV[8] default mode ("conversation"|"rolling")
-- ARGV[9] slot length (ms), ARGV[10] TTL slack (ms), ARGV[11] most expired slots trimmed per call
-- ARGV[12..] recipients, normalised
-- Returns {"moved", portfolio|""} when the sender's state lives at another home; otherwise
-- {now, limit, tier, then per recipient: decision, expires_at|-1, retry_after|-1, used, reservation|""}
-- Decisions: 1 allowed new, 2 allowed counted, 3 allowed service window, 4 denied limit,
-- 5 denied outside service window.

local win, meta, seqkey, polkey, service, residency = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6]
local now = clock(ARGV[1])
local ok, where = resident(ARGV[2], residency, ARGV[3])
if not ok then
  return { 'moved', where }
end

local sender = ARGV[3]
local free_form = ARGV[4] == 'f'
local dry = ARGV[5] == '1'
local pol = redis.call('HMGET', polkey, 'limit', 'tier', 'mode')
local limit = tonumber(pol[1] or ARGV[6])
local tier = pol[2] or ARGV[7]
local rolling = (pol[3] or ARGV[8]) == 'rolling'
local slot_ms, slack = tonumber(ARGV[9]), tonumber(ARGV[10])

if not dry then
  trim(win, meta, now, tonumber(ARGV[11]))
end
local used = redis.call('ZCOUNT', win, '(' .. fmt(now), '+inf')

-- The overlay: slots this batch opens or extends (recipient -> new expiry), and the metadata
-- it writes (recipient -> "<reservation>|<sender>").
local moved, nmoved, metas = {}, 0, {}
local seq = nil

-- Expiry of the (k+1)-th earliest live slot, this batch's changes included: the moment after
-- which enough slots have freed for one more.
local function kth(k)
  local rows = redis.call('ZRANGEBYSCORE', win, '(' .. fmt(now), '+inf', 'WITHSCORES', 'LIMIT', 0, k + nmoved + 1)
  local ex = {}
  for j = 1, #rows, 2 do
    if not moved[rows[j]] then
      ex[#ex + 1] = tonumber(rows[j + 1])
    end
  end
  for _, e in pairs(moved) do
    ex[#ex + 1] = e
  end
  table.sort(ex)
  return ex[k + 1]
end

local function set_slot(r, until_ms)
  if not moved[r] then
    nmoved = nmoved + 1
  end
  moved[r] = until_ms
end

local out = { now, limit, tier }
for i = 12, #ARGV do
  local r = ARGV[i]
  local decision, expires, retry, resv = 0, -1, -1, ''
  local sw = redis.call('ZSCORE', service, r)
  sw = sw and tonumber(sw)
  if sw and sw > now then
    decision, expires = 3, sw
  elseif free_form then
    decision = 5
  else
    local cur = moved[r]
    if not cur then
      local s = redis.call('ZSCORE', win, r)
      cur = s and tonumber(s)
    end
    if cur and cur > now then
      decision = 2
      if rolling and cur < now + slot_ms then
        cur = now + slot_ms
        set_slot(r, cur)
      end
      expires = cur
      -- A later counted delivery: the reservation can no longer free this slot.
      local m = metas[r] or redis.call('HGET', meta, r) or ('|' .. sender)
      metas[r] = '|' .. string.sub(m, string.find(m, '|', 1, true) + 1)
    elseif limit == 0 or used < limit then
      decision = 1
      seq = (seq or tonumber(redis.call('GET', seqkey) or '0')) + 1
      resv = fmt(now) .. '.' .. fmt(seq)
      expires = now + slot_ms
      set_slot(r, expires)
      metas[r] = resv .. '|' .. sender
      used = used + 1
    else
      decision = 4
      retry = kth(used - limit) - now
    end
  end
  out[#out + 1] = decision
  out[#out + 1] = expires
  out[#out + 1] = retry
  out[#out + 1] = used
  out[#out + 1] = resv
end

if not dry and (nmoved > 0 or next(metas) ~= nil) then
  local z, h = {}, {}
  for r, e in pairs(moved) do
    z[#z + 1] = fmt(e)
    z[#z + 1] = r
  end
  for r, m in pairs(metas) do
    h[#h + 1] = r
    h[#h + 1] = m
  end
  if #z > 0 then
    chunked('ZADD', win, z, 512)
  end
  chunked('HSET', meta, h, 512)
  if seq then
    redis.call('SET', seqkey, fmt(seq))
  end
  local until_ms = latest(win, now)
  keep(win, until_ms, now, slack)
  keep(meta, until_ms, now, slack)
  keep(seqkey, until_ms, now, slack)
end
return out
