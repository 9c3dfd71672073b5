#!lua name=floor
-- The floor of a compact layout: one decision of one recipient at a sender's own home, with the
-- state the default policy engine consults (the window and its count, the slot, the service
-- window, the pair rate, the throughput, the projection index, the ledger marker), stored as
--   <base>:h      hash  policy fields, the window's count and sequence, the throughput TAT
--   <base>:wx     zset  shard -> its earliest expiry (trimming)
--   <base>:w:<i>  zset  recipient -> slot expiry (counting, retry_after)
--   <base>:r:<i>  hash  recipient -> "slot expiry,seq,touched,pair TAT,service window,unique time"
--   <base>:uq     zset  recipient -> unique time
-- and nothing else: no portfolio, marketing, statuses, settling, TTL renewal or shard splits.
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

local function decide(keys, args)
  local base, marker = keys[1], keys[2]
  local now, r = tonumber(args[1]), args[2]
  local lost = redis.call('GET', marker)
  local flat = redis.call('HGETALL', base .. ':h')
  local h = {}
  for i = 1, #flat, 2 do
    h[flat[i]] = flat[i + 1]
  end
  local limit = tonumber(h.custom or '1000')
  local mps = tonumber(h.mps or '80')
  local n, seq = tonumber(h.n or '0'), tonumber(h.seq or '0')
  local tat, lvl = tonumber(h.tat or '0'), tonumber(h.lvl or '0')
  local expired = redis.call('ZRANGEBYSCORE', base .. ':wx', '-inf', fmt(now))
  if #expired > 0 then
    return redis.error_reply('the floor measures no expiry')
  end
  local i = hash(r) % (2 ^ lvl)
  local rkey = base .. ':r:' .. i
  local rec = redis.call('HGET', rkey, r)
  local exp, rseq, touched, ptat, sw, uqt = 0, 0, '0', 0, 0, 0
  if rec then
    local a, b, c, d, e, f = string.match(rec, '^(%d*),(%d*),(%d*),(%d*),(%d*),(%d*)$')
    exp, rseq, touched, ptat, sw, uqt = tonumber(a), tonumber(b), c, tonumber(d), tonumber(e), tonumber(f)
  end
  local now_us = now * 1000
  local live = exp > now
  local out = { now, limit, '1k', limit, lost and 0 or 1, -1 }
  if sw <= now and not live and n >= limit then
    out[#out + 1], out[#out + 2], out[#out + 3], out[#out + 4], out[#out + 5] = 4, -1, 1, n, ''
    return out
  end
  local pint, pburst = 6000000, 1
  local pt = math.max(ptat, now_us)
  if pt - now_us > pint * (pburst - 1) then
    out[#out + 1], out[#out + 2], out[#out + 3], out[#out + 4], out[#out + 5] = 7, -1, (pt - now_us) / 1000, n, ''
    return out
  end
  local tint = math.floor(1000000 / mps)
  local tt = math.max(tat, now_us)
  if tt - now_us > tint * (mps - 1) then
    out[#out + 1], out[#out + 2], out[#out + 3], out[#out + 4], out[#out + 5] = 6, -1, (tt - now_us) / 1000, n, ''
    return out
  end
  ptat, tat = pt + pint, tt + tint
  local decision, resv = 2, ''
  local hs = { 'tat', fmt(tat) }
  if live then
    touched = '1'
  else
    decision, seq, n, exp, rseq, touched, uqt = 1, seq + 1, n + 1, now + 86400000, seq + 1, '0', now
    resv = fmt(now) .. '.' .. fmt(seq)
    redis.call('ZADD', base .. ':w:' .. i, fmt(exp), r)
    redis.call('ZADD', base .. ':wx', 'LT', fmt(exp), i)
    redis.call('ZADD', base .. ':uq', fmt(now), r)
    hs[#hs + 1], hs[#hs + 2], hs[#hs + 3], hs[#hs + 4], hs[#hs + 5], hs[#hs + 6] = 'n', fmt(n), 'seq', fmt(seq), 'last', fmt(exp)
  end
  redis.call('HSET', rkey, r, table.concat({ fmt(exp), fmt(rseq), touched, fmt(ptat), fmt(sw), fmt(uqt) }, ','))
  redis.call('TIME')
  redis.call('HSET', base .. ':h', unpack(hs))
  out[#out + 1], out[#out + 2], out[#out + 3], out[#out + 4], out[#out + 5] = decision, exp, -1, n, resv
  return out
end

redis.register_function('floor', decide)

-- The same for a batch: every recipient's record read in one HMGET per shard, every write in
-- one command per key.
local function decide_batch(keys, args)
  local base, marker = keys[1], keys[2]
  local now = tonumber(args[1])
  local lost = redis.call('GET', marker)
  local flat = redis.call('HGETALL', base .. ':h')
  local h = {}
  for i = 1, #flat, 2 do
    h[flat[i]] = flat[i + 1]
  end
  local limit = tonumber(h.custom or '1000')
  local mps = tonumber(h.mps or '80')
  local n, seq = tonumber(h.n or '0'), tonumber(h.seq or '0')
  local tat, lvl = tonumber(h.tat or '0'), tonumber(h.lvl or '0')
  local expired = redis.call('ZRANGEBYSCORE', base .. ':wx', '-inf', fmt(now))
  if #expired > 0 then
    return redis.error_reply('the floor measures no expiry')
  end
  local by, shard = {}, {}
  for k = 2, #args do
    local r = args[k]
    local i = hash(r) % (2 ^ lvl)
    shard[r] = i
    by[i] = by[i] or {}
    table.insert(by[i], r)
  end
  local recs = {}
  for i, rs in pairs(by) do
    local v = redis.call('HMGET', base .. ':r:' .. i, unpack(rs))
    for j, r in ipairs(rs) do
      recs[r] = v[j]
    end
  end
  local now_us = now * 1000
  local pint, pburst = 6000000, 1
  local tint = math.floor(1000000 / mps)
  local out = { now, limit, '1k', limit, lost and 0 or 1, -1 }
  local hrec, zw, zx, zu, opened = {}, {}, {}, {}, false
  for k = 2, #args do
    local r = args[k]
    local i = shard[r]
    local exp, rseq, touched, ptat, sw, uqt = 0, 0, '0', 0, 0, 0
    local rec = recs[r]
    if rec then
      local a, b, c, d, e, f = string.match(rec, '^(%d*),(%d*),(%d*),(%d*),(%d*),(%d*)$')
      exp, rseq, touched, ptat, sw, uqt = tonumber(a), tonumber(b), c, tonumber(d), tonumber(e), tonumber(f)
    end
    local live = exp > now
    local pt = math.max(ptat, now_us)
    local tt = math.max(tat, now_us)
    if sw <= now and not live and n >= limit then
      out[#out + 1], out[#out + 2], out[#out + 3], out[#out + 4], out[#out + 5] = 4, -1, 1, n, ''
    elseif pt - now_us > pint * (pburst - 1) then
      out[#out + 1], out[#out + 2], out[#out + 3], out[#out + 4], out[#out + 5] = 7, -1, (pt - now_us) / 1000, n, ''
    elseif tt - now_us > tint * (mps - 1) then
      out[#out + 1], out[#out + 2], out[#out + 3], out[#out + 4], out[#out + 5] = 6, -1, (tt - now_us) / 1000, n, ''
    else
      ptat, tat = pt + pint, tt + tint
      local decision, resv = 2, ''
      if live then
        touched = '1'
      else
        decision, seq, n, exp, rseq, touched, uqt = 1, seq + 1, n + 1, now + 86400000, seq + 1, '0', now
        resv = fmt(now) .. '.' .. fmt(seq)
        opened = true
        zw[i] = zw[i] or {}
        table.insert(zw[i], fmt(exp))
        table.insert(zw[i], r)
        zx[i] = exp
        zu[#zu + 1] = fmt(now)
        zu[#zu + 1] = r
      end
      hrec[i] = hrec[i] or {}
      table.insert(hrec[i], r)
      table.insert(hrec[i], table.concat({ fmt(exp), fmt(rseq), touched, fmt(ptat), fmt(sw), fmt(uqt) }, ','))
      out[#out + 1], out[#out + 2], out[#out + 3], out[#out + 4], out[#out + 5] = decision, exp, -1, n, resv
    end
  end
  for i, z in pairs(zw) do
    redis.call('ZADD', base .. ':w:' .. i, unpack(z))
    redis.call('ZADD', base .. ':wx', 'LT', fmt(zx[i]), i)
  end
  if #zu > 0 then
    redis.call('ZADD', base .. ':uq', unpack(zu))
  end
  for i, hr in pairs(hrec) do
    redis.call('HSET', base .. ':r:' .. i, unpack(hr))
  end
  redis.call('TIME')
  local hs = { 'tat', fmt(tat) }
  if opened then
    hs[#hs + 1], hs[#hs + 2], hs[#hs + 3], hs[#hs + 4] = 'n', fmt(n), 'seq', fmt(seq)
  end
  redis.call('HSET', base .. ':h', unpack(hs))
  return out
end

redis.register_function('floor_batch', decide_batch)

-- The anchor (BENCHMARKS.md): the simplest exact sliding window on one sorted set.
redis.register_function('anchor', function(keys, args)
  local key, now, window, limit, member = keys[1], tonumber(args[1]), tonumber(args[2]), tonumber(args[3]), args[4]
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now - window)
  if redis.call('ZSCORE', key, member) then return { 1 } end
  if redis.call('ZCARD', key) < limit then
    redis.call('ZADD', key, now, member); redis.call('PEXPIRE', key, window); return { 2 }
  end
  return { 0, redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')[2] }
end)
