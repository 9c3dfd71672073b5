#!lua name=floor
-- The floor of a compact layout: a decision at a sender's own home, with the state the default
-- policy engine consults (the window and its count, the slot, the service window, the pair
-- rate, the throughput, the projection index, the ledger marker), stored as
--   <base>:h      hash  policy fields, the window's count and sequence, the throughput TAT
--   <base>:wx     zset  shard -> its earliest expiry (trimming)
--   <base>:w:<i>  zset  recipient -> slot expiry (counting, retry_after)
--   <base>:r:<i>  hash  recipient -> "slot expiry,seq,touched,pair TAT,service window,unique time"
--   <base>:uq     zset  recipient -> unique time
-- and nothing else: no portfolio, marketing, statuses, settling, TTL renewal or shard splits.
-- `floor` decides one recipient, `floor_batch` many (every read and write one command per key).
-- KEYS[1] the home's key base, KEYS[2] the ledger marker; ARGV now (ms), recipients.
-- Replies as the acquire function's (lua/acquire.lua).
local SLOT_MS, PAIR_INTERVAL_US, PAIR_BURST = 86400000, 6000000, 1

local function fmt(n)
  return string.format('%d', n)
end

local function hash(r)
  local h = 5381
  for i = 1, #r do
    h = (h * 33 + string.byte(r, i)) % 4294967296
  end
  return h
end

-- What every call reads first: the marker, the one hash, and whether a shard has expired slots
-- (the floor's workload has none). Returns the state and the reply's head, or an error reply.
local function open(keys, now)
  local base = keys[1]
  local lost = redis.call('GET', keys[2])
  local flat = redis.call('HGETALL', base .. ':h')
  local h = {}
  for i = 1, #flat, 2 do
    h[flat[i]] = flat[i + 1]
  end
  local S = {
    base = base, now = now, now_us = now * 1000, limit = tonumber(h.custom or '1000'),
    mps = tonumber(h.mps or '80'), n = tonumber(h.n or '0'), seq = tonumber(h.seq or '0'),
    tat = tonumber(h.tat or '0'), shards = 2 ^ tonumber(h.lvl or '0'), opened = false,
  }
  if #redis.call('ZRANGEBYSCORE', base .. ':wx', '-inf', fmt(now)) > 0 then
    return nil, redis.error_reply('the floor measures no expiry')
  end
  return S, { now, S.limit, '1k', S.limit, lost and 0 or 1, -1 }
end

local function answer(out, decision, expires, retry, used, resv)
  local k = #out
  out[k + 1], out[k + 2], out[k + 3], out[k + 4], out[k + 5] = decision, expires, retry, used, resv
end

-- Decides recipient r with its stored record `rec` (or nil), appends the answer to `out` and
-- returns the record to store (nil when refused) and the new slot's expiry (nil when none).
local function decide(S, r, rec, out)
  local now, now_us, n, mps = S.now, S.now_us, S.n, S.mps
  local exp, rseq, touched, ptat, sw, uqt = 0, 0, '0', 0, 0, 0
  if rec then
    local a, b, c, d, e, f = string.match(rec, '^(%d*),(%d*),(%d*),(%d*),(%d*),(%d*)$')
    exp, rseq, touched, ptat, sw, uqt = tonumber(a), tonumber(b), c, tonumber(d), tonumber(e), tonumber(f)
  end
  local live = exp > now
  local pt = math.max(ptat, now_us)
  local tint = math.floor(1000000 / mps)
  local tt = math.max(S.tat, now_us)
  if sw <= now and not live and n >= S.limit then
    return answer(out, 4, -1, 1, n, '')
  elseif pt - now_us > PAIR_INTERVAL_US * (PAIR_BURST - 1) then
    return answer(out, 7, -1, (pt - now_us) / 1000, n, '')
  elseif tt - now_us > tint * (mps - 1) then
    return answer(out, 6, -1, (tt - now_us) / 1000, n, '')
  end
  ptat, S.tat, S.admitted = pt + PAIR_INTERVAL_US, tt + tint, true
  local decision, resv, opened = 2, '', nil
  if live then
    touched = '1'
  else
    local seq = S.seq + 1
    n, S.seq, S.n, S.opened = n + 1, seq, n + 1, true
    decision, exp, rseq, touched, uqt = 1, now + SLOT_MS, seq, '0', now
    resv, opened = fmt(now) .. '.' .. fmt(seq), exp
  end
  answer(out, decision, exp, -1, n, resv)
  return table.concat({ fmt(exp), fmt(rseq), touched, fmt(ptat), fmt(sw), fmt(uqt) }, ','), opened
end

-- The hash's fields this call changed (nothing when every recipient was refused).
local function save(S)
  if not S.admitted then
    return
  end
  local hs = { 'tat', fmt(S.tat) }
  if S.opened then
    hs[#hs + 1], hs[#hs + 2], hs[#hs + 3], hs[#hs + 4] = 'n', fmt(S.n), 'seq', fmt(S.seq)
  end
  redis.call('TIME')
  redis.call('HSET', S.base .. ':h', unpack(hs))
end

redis.register_function('floor', function(keys, args)
  local S, out = open(keys, tonumber(args[1]))
  if not S then
    return out
  end
  local r = args[2]
  local i = hash(r) % S.shards
  local rkey = S.base .. ':r:' .. i
  local rec, exp = decide(S, r, redis.call('HGET', rkey, r), out)
  if exp then
    redis.call('ZADD', S.base .. ':w:' .. i, fmt(exp), r)
    redis.call('ZADD', S.base .. ':wx', 'LT', fmt(exp), i)
    redis.call('ZADD', S.base .. ':uq', fmt(S.now), r)
  end
  if rec then
    redis.call('HSET', rkey, r, rec)
  end
  save(S)
  return out
end)

redis.register_function('floor_batch', function(keys, args)
  local S, out = open(keys, tonumber(args[1]))
  if not S then
    return out
  end
  local by, shard = {}, {}
  for k = 2, #args do
    local r = args[k]
    local i = hash(r) % S.shards
    shard[r] = i
    by[i] = by[i] or {}
    table.insert(by[i], r)
  end
  local recs = {}
  for i, rs in pairs(by) do
    local v = redis.call('HMGET', S.base .. ':r:' .. i, unpack(rs))
    for j, r in ipairs(rs) do
      recs[r] = v[j]
    end
  end
  local hrec, zw, zx, zu = {}, {}, {}, {}
  for k = 2, #args do
    local r = args[k]
    local i = shard[r]
    local rec, exp = decide(S, r, recs[r], out)
    if exp then
      zw[i] = zw[i] or {}
      table.insert(zw[i], fmt(exp))
      table.insert(zw[i], r)
      zx[i] = exp
      zu[#zu + 1] = fmt(S.now)
      zu[#zu + 1] = r
    end
    if rec then
      hrec[i] = hrec[i] or {}
      table.insert(hrec[i], r)
      table.insert(hrec[i], rec)
    end
  end
  for i, z in pairs(zw) do
    redis.call('ZADD', S.base .. ':w:' .. i, unpack(z))
    redis.call('ZADD', S.base .. ':wx', 'LT', fmt(zx[i]), i)
  end
  if #zu > 0 then
    redis.call('ZADD', S.base .. ':uq', unpack(zu))
  end
  for i, hr in pairs(hrec) do
    redis.call('HSET', S.base .. ':r:' .. i, unpack(hr))
  end
  save(S)
  return out
end)
