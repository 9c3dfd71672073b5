-- lib.lua: helpers prepended to every waquota script (not a script of its own).
--
-- Times are integer milliseconds since the Unix epoch. Numbers go back to Redis through
-- string.format('%d') so that 13-digit timestamps never pass through Lua's %.14g.

local function fmt(n)
  return string.format('%d', n)
end

-- This Redis server's TIME in ms, read at most once per script call.
local redis_now
local function redis_ms()
  if not redis_now then
    local t = redis.call('TIME')
    redis_now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  end
  return redis_now
end

-- The request's clock: the trusted client time when given, else this Redis server's TIME, so
-- that every instance and worker shares one clock.
local function clock(at)
  if at ~= '' then
    return tonumber(at)
  end
  return redis_ms()
end

-- Does `sender` keep its state at this home? A sender's own home ("s") holds it unless the
-- "away" key names the portfolio it moved to; a portfolio home ("p") holds its members' state.
-- Returns true, or false and where to look next (a portfolio id, or "" for the sender's own home).
-- `away`: the sender home's "away" string when the caller already read it (false when absent).
local function resident(kind, residency_key, sender, away)
  if kind == 's' then
    if away == nil then
      away = redis.call('GET', residency_key)
    end
    if away then
      return false, away
    end
    return true
  end
  if redis.call('SISMEMBER', residency_key, sender) == 1 then
    return true
  end
  return false, ''
end

-- The TTL that keeps a key alive until `until_ms` on the request's clock, plus slack. It is
-- relative to that clock, never absolute, so a trusted clock far from real time (a replay of
-- last year) cannot make Redis drop state early.
local function ttl_ms(until_ms, now, slack)
  return fmt(math.max(until_ms - now, 0) + math.max(slack, 1))
end

-- Keeps `key` alive until `until_ms`, the latest moment anything in it matters (callers pass the
-- latest entry), set on every write without reading the old TTL first.
local function keep(key, until_ms, now, slack)
  redis.call('PEXPIRE', key, ttl_ms(until_ms, now, slack))
end

-- Keeps `key` alive until at least `until_ms` (+ slack) without shortening a longer life, and
-- without reading its entries: PEXPIRE GT, then PEXPIRE NX only when that changed nothing (a key
-- that has no TTL yet, or one already kept longer).
local function keep_at_least(key, ttl)
  if redis.call('PEXPIRE', key, ttl, 'GT') == 0 then
    redis.call('PEXPIRE', key, ttl, 'NX')
  end
end

local function extend(key, until_ms, now, slack)
  keep_at_least(key, ttl_ms(until_ms, now, slack))
end

-- Latest slot expiry in a window zset (or `now` when empty).
local function latest(zkey, now)
  local last = redis.call('ZRANGE', zkey, -1, -1, 'WITHSCORES')
  if last[2] then
    return tonumber(last[2])
  end
  return now
end

-- Byte-wise a > b (Lua's own string comparison follows the locale; zsets order by bytes).
local function bytes_gt(a, b)
  local n = math.min(#a, #b)
  for i = 1, n do
    local x, y = string.byte(a, i), string.byte(b, i)
    if x ~= y then
      return x > y
    end
  end
  return #a > #b
end

-- Calls redis.call(cmd, key, ...) with `args` in chunks, so no unpack() exceeds Lua's stack.
-- Returns the sum of the replies (ZADD: members added).
local function chunked(cmd, key, args, step)
  local n = 0
  for i = 1, #args, step do
    local last = math.min(i + step - 1, #args)
    n = n + redis.call(cmd, key, unpack(args, i, last))
  end
  return n
end

-- Reads the scores of `names` in the sorted set `key` into `into` (recipient -> number, or the
-- stored string with `raw`; absent names are left out), in one ZMSCORE. With `lead`, that
-- member is read first in the same command, and its score returned.
local function zscores(key, names, into, raw, lead)
  local got, o
  if lead then
    got, o = redis.call('ZMSCORE', key, lead, unpack(names)), 1
  elseif #names > 0 then
    got, o = redis.call('ZMSCORE', key, unpack(names)), 0
  else
    return nil
  end
  for j, r in ipairs(names) do
    local v = got[j + o]
    if v then
      into[r] = raw and v or tonumber(v)
    end
  end
  return lead and got[1] or nil
end

-- The window of a home is sharded so that every piece stays in Redis's compact listpack encoding
-- (a plain zset leaves it at 128 members and then costs ~100 B per slot; docs/internals.md,
-- "Redis key schema"):
--   header  hash  <base>:w      n (slots stored), lvl, sp (linear-hashing level and split
--                                pointer), seq (last reservation sequence), sb (the first one),
--                                last (latest expiry), tr (real time until which every key of
--                                the window is kept alive)
--   index   zset  <base>:wx     shard -> its earliest expiry (trimming, counting, retry_after)
--   shard i zset  <base>:w:<i>  recipient -> slot expiry (ms)
--           hash  <base>:wm:<i> recipient -> slot value "<seq - sb><touched>[,<prev unique>[,<opener>]]"
-- A recipient's shard is its hash modulo 2^lvl, or modulo 2^(lvl+1) below the split pointer
-- (linear hashing): the window grows and shrinks one shard at a time, so no call ever rehashes
-- more than one shard. Expired slots are trimmed before counting, so n is the live count.
local SHARD_FILL = 48
-- How much longer than needed the window's keys are kept alive when their TTLs are renewed, so
-- that most writes need no PEXPIRE (a renewal touches every shard: once an hour under traffic).
local RENEW_MS = 3600000

-- The first 32 bits of the recipient's SHA-1 (computed in C): uniform low bits, which pick the
-- shard, even for recipients that differ only in their last digits.
-- Remembered across calls (a pure function of r; the window, the service windows and the pair
-- rates of one decision hash the same recipient), up to RHASH_MEMO recipients, then forgotten.
local RHASH_MEMO = 4096
local rhash_memo, rhash_n = {}, 0
local function rhash(r)
  local h = rhash_memo[r]
  if h then
    return h
  end
  h = tonumber(string.sub(redis.sha1hex(r), 1, 8), 16)
  if rhash_n >= RHASH_MEMO then
    rhash_memo, rhash_n = {}, 0
  end
  rhash_memo[r], rhash_n = h, rhash_n + 1
  return h
end

-- A recipient's place in a window listing: its hash with the 32 bits reversed (as
-- model::listing_position). A shard holds the recipients whose hash ends in the shard's bits, so
-- in this order shard i is one contiguous range, starting at win_pos of i itself.
local function rev32(h)
  local r = 0
  for _ = 1, 32 do
    local b = h % 2
    r = r * 2 + b
    h = (h - b) / 2
  end
  return r
end

local function win_pos(r)
  return rev32(rhash(r))
end

-- A policy hash as a table of its fields (a field it lacks reads as nil). A policy stores few of
-- its 18 possible fields, so HGETALL, which names none, costs Redis less than an HMGET naming all
-- of them: a few thousand instructions a decision (BENCHMARKS.md, "Trims and reads taken off the
-- decision"). The window header is read with HMGET: it holds every field it is asked for, and
-- HGETALL measured dearer there.
local function hash_read(key)
  local flat, f = redis.call('HGETALL', key), {}
  for i = 1, #flat, 2 do
    f[flat[i]] = flat[i + 1]
  end
  return f
end

local function win_open(header, index)
  local f = redis.call('HMGET', header, 'n', 'lvl', 'sp', 'seq', 'last', 'sb', 'tr', 'rp')
  local W = {
    header = header, index = index, zp = header .. ':', mp = string.sub(header, 1, -2) .. 'wm:',
    n = tonumber(f[1] or '0'), lvl = tonumber(f[2] or '0'), sp = tonumber(f[3] or '0'),
    seq = tonumber(f[4] or '0'), last = tonumber(f[5] or '0'), sb = tonumber(f[6] or ''),
    tr = tonumber(f[7] or '0'), sweeping = f[8] ~= false, at = {}, fresh = {},
  }
  -- The header as read (a missing field as its default), so win_save writes only what changed.
  W.read = { n = W.n, lvl = W.lvl, sp = W.sp, seq = W.seq, last = W.last, sb = W.sb, tr = W.tr }
  return W
end

-- How many shards the window has: 2^lvl, plus those split at this level.
local function win_shards(W)
  return 2 ^ W.lvl + W.sp
end

-- The shard of a hash, and how many low bits of the hash name it.
local function win_shard_of(W, h)
  local b = 2 ^ W.lvl
  local i = h % b
  if i < W.sp then
    return h % (2 * b), W.lvl + 1
  end
  return i, W.lvl
end

local function win_shard(W, r)
  local i = W.at[r]
  if i then
    return i
  end
  i = win_shard_of(W, rhash(r))
  W.at[r] = i
  return i
end

-- A sender's per-recipient sorted sets (its service windows, its pair rates) are split into
-- parts by the same linear hashing, so that every part stays a listpack: a sorted set of more
-- than 128 members is a skiplist at ~100 B a member, a listpack ~20-30 B (docs/internals.md,
-- "Redis key schema"). Part 0 is the key itself, so a set written before it ever grew is part 0
-- of a one-part set as it stands; part i > 0 is "<key>/<i>". Once split, part 0 also holds the
-- shape as the member SSET_SHAPE, scored -(2^60 + (lvl * 2^24 + sp) * 256): below every time a
-- request may carry (|ms| and |us| stay under 2^53, model::MAX_ABS_MS) and exact in a double,
-- so trimming above SSET_FLOOR never drops it; it is read by the same ZMSCORE that reads part
-- 0's members, so a set of one part costs no extra command. Part 0 is kept alive as long as any
-- part (each write extends it too), so the shape outlives every member it locates. A write that
-- leaves a part nearly empty undoes the last split when its two parts fit in half of one
-- (sset_merge), so a set that grew in a burst shrinks back; an idle set expires whole.
-- SSET_FILL, the entries a part holds before it splits, comes from the prelude (96 by default:
-- config::SET_PART_FILL).
local SSET_SHAPE = '~'
local SSET_BASE = 2 ^ 60
local SSET_FLOOR = '(-576460752303423488' -- -(2^59), exclusive
local SSET_SP = 2 ^ 24

local function sset_part(base, i)
  if i == 0 then
    return base
  end
  return base .. '/' .. fmt(i)
end

local function sset_shape(S, score)
  if score then
    local code = (-tonumber(score) - SSET_BASE) / 256
    S.sp = code % SSET_SP
    S.lvl = (code - S.sp) / SSET_SP
  end
  return S
end

local function sset_shape_score(S)
  return fmt(-(SSET_BASE + (S.lvl * SSET_SP + S.sp) * 256))
end

local function sset_is_split(S)
  return S.lvl > 0 or S.sp > 0
end

local function sset_part_of(S, r)
  if not sset_is_split(S) then
    return 0
  end
  return (win_shard_of(S, rhash(r)))
end

-- The last split: the part it came from, the part it made, and the shape before it.
local function sset_last_split(S)
  local lvl, sp = S.lvl, S.sp
  if sp == 0 then
    lvl = lvl - 1
    sp = 2 ^ lvl
  end
  sp = sp - 1
  return sp, sp + 2 ^ lvl, lvl
end

-- How many parts the set has (its shape read from part 0).
local function sset_parts(base)
  local S = sset_shape({ lvl = 0, sp = 0 }, redis.call('ZSCORE', base, SSET_SHAPE))
  return 2 ^ S.lvl + S.sp
end

-- The parts beyond part 0 of the split sets among `keys` (a sender's keys, the sorted sets
-- among them its sets), by key, then by part: the order in which a move hands them over.
local function sset_further_parts(keys)
  local out = {}
  for _, k in ipairs(keys) do
    if redis.call('TYPE', k).ok == 'zset' then
      for p = 1, sset_parts(k) - 1 do
        out[#out + 1] = sset_part(k, p)
      end
    end
  end
  return out
end

-- Reads the scores of `names` in the set at `base` into `into` (recipient -> number, or the
-- stored string with `raw`): one ZMSCORE per part touched. Returns the set's shape, which
-- sset_write needs.
local function sset_scores(base, names, into, raw)
  local S = sset_shape({ base = base, lvl = 0, sp = 0 }, zscores(base, names, into, raw, SSET_SHAPE))
  if sset_is_split(S) then
    -- Part 0 answered for its own names (a name is stored in its part only); the others now.
    local by = {}
    for _, r in ipairs(names) do
      local i = sset_part_of(S, r)
      if i ~= 0 then
        by[i] = by[i] or {}
        table.insert(by[i], r)
      end
    end
    for i, rs in pairs(by) do
      zscores(sset_part(base, i), rs, into, raw)
    end
  end
  return S
end

-- One step of linear hashing: part sp gives the members whose hash says so to part sp + 2^lvl.
-- Both parts are written afresh with the source's TTL, so each is a listpack again even if a
-- large batch had pushed the source past 128 members (Redis never converts a skiplist back),
-- and nothing an earlier shape left in the new part (a set moved away and back) reappears.
-- Returns both parts' new sizes.
local function sset_split(S)
  local b = 2 ^ S.lvl
  local from, to = S.sp, S.sp + b
  local src, dst = sset_part(S.base, from), sset_part(S.base, to)
  local rows = redis.call('ZRANGE', src, 0, -1, 'WITHSCORES')
  local ttl = redis.call('PTTL', src)
  local stay, go = {}, {}
  local shaped = false
  for j = 1, #rows, 2 do
    local r = rows[j]
    local into = stay
    if r == SSET_SHAPE then
      shaped = true
    elseif rhash(r) % (2 * b) == to then
      into = go
    end
    into[#into + 1] = rows[j + 1]
    into[#into + 1] = r
  end
  if from == 0 and not shaped then
    -- Part 0 keeps the shape (its score is set by the caller), so it is written again with
    -- the source's TTL even when every member moves out.
    stay[#stay + 1] = sset_shape_score(S)
    stay[#stay + 1] = SSET_SHAPE
  end
  redis.call('DEL', src, dst)
  for _, kv in ipairs({ { src, stay }, { dst, go } }) do
    if #kv[2] > 0 then
      chunked('ZADD', kv[1], kv[2], 512)
      -- PTTL is 0 in a key's last millisecond: it still expires.
      if ttl >= 0 then
        keep_at_least(kv[1], math.max(ttl, 1))
      end
    end
  end
  S.sp = S.sp + 1
  if S.sp == b then
    S.lvl, S.sp = S.lvl + 1, 0
  end
  return from, #stay / 2, to, #go / 2
end

-- Undoes the last split: its new part goes back into the part it came from, keeping the longer
-- TTL of the two. A set that grew in a burst and has emptied since is back to one part after a
-- few writes, and costs a decision no more commands than a set that never grew.
local function sset_merge(S)
  local into, from, lvl = sset_last_split(S)
  local src, dst = sset_part(S.base, from), sset_part(S.base, into)
  local rows = redis.call('ZRANGE', src, 0, -1, 'WITHSCORES')
  if #rows > 0 then
    local go = {}
    for j = 1, #rows, 2 do
      go[#go + 1] = rows[j + 1]
      go[#go + 1] = rows[j]
    end
    chunked('ZADD', dst, go, 512)
    keep_at_least(dst, math.max(redis.call('PTTL', src), 1))
    redis.call('DEL', src)
  end
  S.lvl, S.sp = lvl, into
end

-- Splits per write: 8, or one per SSET_FILL / 2 members written when that is more, so a batch of
-- new members reaches a balanced shape in the same call, and no call's work grows with the set,
-- only with the batch.
local SSET_SPLITS_PER_CALL = 8

-- Writes `z` (recipient -> score) into the set of shape S (from sset_scores): each part written
-- is trimmed of scores up to `past`, written, and kept alive until `until_ms`, and so is part 0.
-- While a part written (or split) holds more than SSET_FILL members, the set splits.
local function sset_write(S, z, past, until_ms, now, slack, steady)
  -- A set whose entries all matter for the same time after their write (`steady`: the
  -- projection index, 30 days) is always kept until this write's `until_ms`, never shortened by
  -- it, so one PEXPIRE does; others may hold an entry kept longer than this write's.
  local renew = steady and keep or extend
  local parts, written = {}, 0
  for r, t in pairs(z) do
    written = written + 1
    local i = sset_part_of(S, r)
    local p = parts[i] or {}
    parts[i] = p
    p[#p + 1] = fmt(t)
    p[#p + 1] = r
  end
  local size = {}
  for i, args in pairs(parts) do
    local key = sset_part(S.base, i)
    redis.call('ZREMRANGEBYSCORE', key, SSET_FLOOR, fmt(past))
    local added = chunked('ZADD', key, args, 512)
    renew(key, until_ms, now, slack)
    if added > 0 or sset_is_split(S) then
      size[i] = redis.call('ZCARD', key)
    end
  end
  if not parts[0] then
    renew(S.base, until_ms, now, slack)
  end
  local splits = 0
  local budget = math.max(SSET_SPLITS_PER_CALL, math.ceil(written / (SSET_FILL / 2)))
  while splits < budget do
    local over = false
    for _, n in pairs(size) do
      if n > SSET_FILL then
        over = true
        break
      end
    end
    if not over then
      break
    end
    local a, na, b, nb = sset_split(S)
    size[a], size[b] = na, nb
    splits = splits + 1
  end
  local merged = false
  if splits == 0 and sset_is_split(S) then
    -- A part written is nearly empty: undo the last split if its two parts fit in half of one.
    local small = false
    for _, n in pairs(size) do
      small = small or n <= math.max(1, SSET_FILL / 8)
    end
    if small then
      local into, from = sset_last_split(S)
      local last, buddy = sset_part(S.base, from), sset_part(S.base, into)
      -- Their dead entries go first (as a write of theirs would drop them), so that parts not
      -- written for a while do not hold a shrinking set apart.
      redis.call('ZREMRANGEBYSCORE', last, SSET_FLOOR, fmt(past))
      redis.call('ZREMRANGEBYSCORE', buddy, SSET_FLOOR, fmt(past))
      if redis.call('ZCARD', last) + redis.call('ZCARD', buddy) <= SSET_FILL / 2 then
        sset_merge(S)
        merged = true
      end
    end
  end
  if merged and not sset_is_split(S) then
    redis.call('ZREM', S.base, SSET_SHAPE)
  elseif splits > 0 or merged then
    redis.call('ZADD', S.base, sset_shape_score(S), SSET_SHAPE)
    extend(S.base, until_ms, now, slack)
  end
end

-- The score of r in the set at `base` (a number), or nil.
local function sset_score(base, r)
  local got = {}
  sset_scores(base, { r }, got)
  return got[r]
end

-- How many members of the set at `base` score above `after` (the shape member not counted).
local function sset_count_after(base, after)
  local n = 0
  for i = 0, sset_parts(base) - 1 do
    n = n + redis.call('ZCOUNT', sset_part(base, i), '(' .. fmt(after), '+inf')
  end
  return n
end

-- The stored expiry of r's slot (possibly past), or nil.
local function win_expiry(W, r)
  local s = redis.call('ZSCORE', W.zp .. win_shard(W, r), r)
  return s and tonumber(s)
end

local function win_value(W, r)
  return redis.call('HGET', W.mp .. win_shard(W, r), r)
end

-- A slot value: its reservation sequence relative to the window's first (string), touched
-- ("0"/"1"), the user's previous unique time ("" or ms) and the opening sender ("" at a sender
-- home: the sender itself). The sequence is kept after a touch so Confirm can still find the
-- slot; Release needs touched = 0. The previous unique time lets a release undo the slot's count
-- in projections. Without the optional parts the value is a small integer, which a listpack
-- stores in 2 to 5 bytes.
local function slot_split(v)
  local c = string.find(v, ',', 1, true)
  if not c then
    return string.sub(v, 1, -2), string.sub(v, -1), '', ''
  end
  local head, rest = string.sub(v, 1, c - 1), string.sub(v, c + 1)
  local d = string.find(rest, ',', 1, true)
  local prev, opener = rest, ''
  if d then
    prev, opener = string.sub(rest, 1, d - 1), string.sub(rest, d + 1)
  end
  return string.sub(head, 1, -2), string.sub(head, -1), prev, opener
end

local function slot_join(seq, touched, prev, opener)
  local v = seq .. touched
  if opener ~= '' then
    return v .. ',' .. prev .. ',' .. opener
  end
  if prev ~= '' then
    return v .. ',' .. prev
  end
  return v
end

-- The next reservation sequence. A window's first is now x 1000, so that a window whose header
-- idled out never hands out a sequence an older token carries.
-- mirrors rules::decide::next_seq
local function win_next_seq(W, now)
  if W.sb then
    W.seq = W.seq + 1
  else
    W.sb = math.max(now * 1000, 1)
    W.seq = W.sb
  end
  return W.seq
end

-- The stored form of a token's sequence (string), or nil when it cannot be this window's.
local function win_rel_seq(W, seq)
  local n = tonumber(seq)
  if not W.sb or not n or n < W.sb then
    return nil
  end
  return fmt(n - W.sb)
end

-- Re-reads shard i's earliest expiry into the index, or drops the shard from it when empty. A
-- shard new to the index is a new pair of keys, which win_save gives a TTL.
local function win_reindex(W, i)
  local first = redis.call('ZRANGE', W.zp .. i, 0, 0, 'WITHSCORES')
  if first[2] then
    if redis.call('ZADD', W.index, first[2], i) == 1 then
      W.fresh[i] = true
    end
  else
    redis.call('ZREM', W.index, i)
  end
end

-- Removes the slots `gone` (recipients) of shard i, keeping the live count; the caller
-- reindexes the shard.
local function win_drop(W, i, gone)
  if #gone > 0 then
    chunked('ZREM', W.zp .. i, gone, 512)
    chunked('HDEL', W.mp .. i, gone, 512)
    W.n = math.max(W.n - #gone, 0)
    W.dirty = true
  end
end

-- Drops every expired slot (expiry <= now): the index names the shards that hold one.
local function win_trim(W, now)
  for _, i in ipairs(redis.call('ZRANGEBYSCORE', W.index, '-inf', fmt(now))) do
    win_drop(W, i, redis.call('ZRANGEBYSCORE', W.zp .. i, '-inf', fmt(now)))
    win_reindex(W, i)
  end
end

-- Live slots, without writing (a dry run or a read: expired slots may still be stored).
local function win_used(W, now)
  local c = W.n
  for _, i in ipairs(redis.call('ZRANGEBYSCORE', W.index, '-inf', fmt(now))) do
    c = c - redis.call('ZCOUNT', W.zp .. i, '-inf', fmt(now))
  end
  return math.max(c, 0)
end

-- Counts the live slots expiring by `until_ms`, in listing order from position `pos`, over at
-- most `budget` shards (docs/contract.md, "Listing a window": each shard is one range of that
-- order). Returns the count and the position to go on from, -1 when every shard is counted. A
-- shard whose range starts before `pos` (it merged with one counted by an earlier call) counts
-- only its slots from `pos` on, so no slot is counted twice.
local function win_count_from(W, pos, until_ms, now, budget)
  local c = 0
  while pos < 2 ^ 32 and budget > 0 do
    budget = budget - 1
    local i, bits = win_shard_of(W, rev32(pos))
    local start = rev32(i)
    if start < pos then
      for _, r in ipairs(redis.call('ZRANGEBYSCORE', W.zp .. i, '(' .. fmt(now), fmt(until_ms))) do
        if win_pos(r) >= pos then
          c = c + 1
        end
      end
    else
      c = c + redis.call('ZCOUNT', W.zp .. i, '(' .. fmt(now), fmt(until_ms))
    end
    pos = start + 2 ^ (32 - bits)
  end
  if pos >= 2 ^ 32 then
    pos = -1
  end
  return c, pos
end

-- The (k+1)-th earliest live expiry over the zsets `keys`, with `overlay` (recipient -> expiry
-- set by this call) applied, or nil. Each zset gives its first k+|overlay|+1 live entries: the
-- k+1 earliest not overridden are among them.
local function kth_live(keys, overlay, k, now)
  local n = 0
  for _ in pairs(overlay) do
    n = n + 1
  end
  local ex = {}
  for _, key in ipairs(keys) do
    local rows = redis.call('ZRANGEBYSCORE', key, '(' .. fmt(now), '+inf', 'WITHSCORES', 'LIMIT', 0, k + n + 1)
    for j = 1, #rows, 2 do
      if not overlay[rows[j]] then
        ex[#ex + 1] = tonumber(rows[j + 1])
      end
    end
  end
  for _, e in pairs(overlay) do
    ex[#ex + 1] = e
  end
  table.sort(ex)
  return ex[k + 1]
end

-- As kth_live over the window's shards. Only shards whose earliest expiry is among the first
-- k+|overlay|+1 (or is already past) can hold one of the k+|overlay|+1 earliest live slots.
local function win_kth(W, overlay, k, now)
  local want = k + 1
  for _ in pairs(overlay) do
    want = want + 1
  end
  local keys = {}
  for _, i in ipairs(redis.call('ZRANGEBYSCORE', W.index, '-inf', fmt(now))) do
    keys[#keys + 1] = W.zp .. i
  end
  for _, i in ipairs(redis.call('ZRANGEBYSCORE', W.index, '(' .. fmt(now), '+inf', 'LIMIT', 0, want)) do
    keys[#keys + 1] = W.zp .. i
  end
  return kth_live(keys, overlay, k, now)
end

-- Writes slot expiries (`exps` recipient -> ms; `extended` marks those that already had a
-- stored slot, whose shard's earliest expiry may then move later) and slot values (`vals`),
-- one command per shard and structure.
local function win_write(W, exps, extended, vals)
  local z, lo, re, h = {}, {}, {}, {}
  for r, e in pairs(exps) do
    local i = win_shard(W, r)
    local t = z[i] or {}
    z[i] = t
    t[#t + 1] = fmt(e)
    t[#t + 1] = r
    if extended[r] then
      re[i] = true
    elseif not lo[i] or e < lo[i] then
      lo[i] = e
    end
    if e > W.last then
      W.last = e
    end
  end
  for r, v in pairs(vals) do
    local i = win_shard(W, r)
    local t = h[i] or {}
    h[i] = t
    t[#t + 1] = r
    t[#t + 1] = v
  end
  W.dirty = true
  for i, t in pairs(z) do
    chunked('ZADD', W.zp .. i, t, 512)
  end
  for i, t in pairs(h) do
    chunked('HSET', W.mp .. i, t, 512)
  end
  -- New slots can only lower a shard's earliest expiry (LT), in one command for all shards; when
  -- any shard is new to the index, all of them are treated as fresh (a new shard is rare).
  local x = {}
  for i, e in pairs(lo) do
    if not re[i] then
      x[#x + 1] = fmt(e)
      x[#x + 1] = i
    end
  end
  if #x > 0 and redis.call('ZADD', W.index, 'LT', unpack(x)) > 0 then
    for j = 2, #x, 2 do
      W.fresh[x[j]] = true
    end
  end
  for i in pairs(re) do
    win_reindex(W, i)
  end
end

-- Removes r's slot (a release). The caller has checked that it exists.
local function win_remove(W, r)
  local i = win_shard(W, r)
  win_drop(W, i, { r })
  win_reindex(W, i)
end

-- Moves the slots of shard `from` for which keep(r) is false into shard `to`.
local function win_move_shard(W, from, to, stays)
  local rows = redis.call('ZRANGE', W.zp .. from, 0, -1, 'WITHSCORES')
  local names, z = {}, {}
  for j = 1, #rows, 2 do
    if not stays(rows[j]) then
      names[#names + 1] = rows[j]
      z[#z + 1] = rows[j + 1]
      z[#z + 1] = rows[j]
    end
  end
  if #names == 0 then
    return
  end
  local h = {}
  for a = 1, #names, 512 do
    local part = { unpack(names, a, math.min(a + 511, #names)) }
    local vals = redis.call('HMGET', W.mp .. from, unpack(part))
    for j, r in ipairs(part) do
      if vals[j] then
        h[#h + 1] = r
        h[#h + 1] = vals[j]
      end
    end
  end
  chunked('ZREM', W.zp .. from, names, 512)
  chunked('HDEL', W.mp .. from, names, 512)
  chunked('ZADD', W.zp .. to, z, 512)
  if #h > 0 then
    chunked('HSET', W.mp .. to, h, 512)
  end
  win_reindex(W, from)
  win_reindex(W, to)
end

-- Splits or merges shards (one at a time) until the average shard holds between SHARD_FILL/4
-- and SHARD_FILL slots; listpack encoding holds up to 128 per shard. Merges are bounded per
-- call (a window emptied at once shrinks over the next calls), and none happens while a Reset
-- sweeps the window (reset.lua), so no slot can move into a shard the sweep has passed.
local MERGES_PER_CALL = 4
local function win_rebalance(W)
  local b = 2 ^ W.lvl
  while W.n > win_shards(W) * SHARD_FILL do
    local from, to, mod = W.sp, W.sp + b, 2 * b
    win_move_shard(W, from, to, function(r)
      return rhash(r) % mod == from
    end)
    W.sp = W.sp + 1
    if W.sp == b then
      W.lvl, W.sp, b = W.lvl + 1, 0, 2 * b
    end
    W.dirty, W.at = true, {}
  end
  local merges = MERGES_PER_CALL
  while not W.sweeping and merges > 0 and win_shards(W) > 1 and W.n * 4 < win_shards(W) * SHARD_FILL do
    merges = merges - 1
    if W.sp == 0 then
      W.lvl, b = W.lvl - 1, b / 2
      W.sp = b
    end
    W.sp = W.sp - 1
    win_move_shard(W, W.sp + b, W.sp, function()
      return false
    end)
    W.fresh[W.sp + b] = nil
    W.dirty, W.at = true, {}
  end
end

local HEADER_FIELDS = { 'n', 'lvl', 'sp', 'seq', 'last', 'sb', 'tr' }

-- Writes the header and keeps the window alive until its latest expiry (+ slack) on the
-- request's clock. The TTLs are renewed for every key of the window at once, RENEW_MS longer
-- than needed, and the header remembers until when (`tr`, in Redis's real time, so a trusted
-- clock cannot fool it); until then only shards created now need a PEXPIRE.
local function win_save(W, now, slack)
  if not W.dirty then
    return
  end
  local real = redis_ms()
  local need = math.max(W.last - now, 0) + math.max(slack, 1)
  local renew = real + need > W.tr
  if renew then
    W.tr = real + need + RENEW_MS
  end
  -- Only the fields that changed: most calls move n, seq and last, and each field written costs a
  -- scan of the header's listpack.
  local h, was = {}, W.read
  for _, k in ipairs(HEADER_FIELDS) do
    local v = W[k]
    if v ~= was[k] then
      h[#h + 1] = k
      h[#h + 1] = v and fmt(v) or ''
    end
  end
  if #h > 0 then
    redis.call('HSET', W.header, unpack(h))
  end
  local ttl = fmt(W.tr - real)
  if renew then
    redis.call('PEXPIRE', W.header, ttl)
    redis.call('PEXPIRE', W.index, ttl)
    for i = 0, win_shards(W) - 1 do
      redis.call('PEXPIRE', W.zp .. i, ttl)
      redis.call('PEXPIRE', W.mp .. i, ttl)
    end
  elseif next(W.fresh) ~= nil then
    redis.call('PEXPIRE', W.index, ttl)
    for i in pairs(W.fresh) do
      redis.call('PEXPIRE', W.zp .. i, ttl)
      redis.call('PEXPIRE', W.mp .. i, ttl)
    end
  end
end

-- A policy hash, with defaults for what it does not say. Tier changes made by auto_tier and the
-- projection state (up_at, up_from, flagged) live in the same hash.
local function read_policy(key, dtier, dmode, drules)
  local f = hash_read(key)
  return {
    tier = f.tier or dtier, custom = tonumber(f.custom or '0'), mode = f.mode or dmode,
    status = f.status or 'connected', quality = f.quality or '', mps = tonumber(f.mps or '0'),
    pint = tonumber(f.pint or '0'), pburst = tonumber(f.pburst or '0'), head = tonumber(f.head or '0'),
    scap = tonumber(f.scap or '0'), mcap = tonumber(f.mcap or '0'), mper = tonumber(f.mper or '0'),
    rules = f.rules or drules, auto = f.auto == '1', flagged = tonumber(f.flagged or ''),
    up_at = tonumber(f.up_at or ''), up_from = f.up_from or '', su = tonumber(f.su or ''),
  }
end

-- The fields of a policy as the Rust side reads them back (Inspect).
local function policy_out(p, out)
  local fields = { p.tier, p.custom, p.mode, p.status, p.quality, p.mps, p.pint, p.pburst, p.head, p.scap,
    p.mcap, p.mper, p.rules, p.auto and 1 or 0, p.su and fmt(p.su) or '' }
  for _, v in ipairs(fields) do
    out[#out + 1] = v
  end
end

-- mirrors model::Policy::limit
local function limit_of(p)
  if p.custom > 0 then
    return p.custom
  end
  return TIER_LIMIT[p.tier]
end

-- mirrors model::Policy::effective_limit
local function effective_of(p)
  local head = p.head
  if head > 99 then
    head = 99
  end
  return math.floor(limit_of(p) * (100 - head) / 100)
end

-- BLOCKING, the statuses that refuse every message, comes with the generated prelude.

-- mirrors model::Policy::eligible_for_upgrade
local function eligible(p)
  return p.status == 'connected'
    and (p.quality == '' or p.quality == 'green' or (p.rules == 'legacy' and p.quality == 'yellow'))
end

-- Applies the tier changes due by `now` to a policy with auto_tier; writes them when `persist`.
-- mirrors rules::settle::settle
local function settle(p, key, now, persist)
  local changed = false
  while p.auto do
    local nxt = TIER_NEXT[p.rules][p.tier]
    local prev = TIER_PREV[p.tier]
    if p.up_at and p.up_from == p.tier and p.up_at <= now and eligible(p) and nxt then
      p.tier, p.up_at, p.up_from, changed = nxt, nil, '', true
    elseif p.rules == 'legacy' and p.status == 'flagged' and p.flagged and p.flagged + FLAGGED_DOWNGRADE_MS <= now and prev then
      p.tier, p.flagged, changed = prev, p.flagged + FLAGGED_DOWNGRADE_MS, true
    else
      break
    end
  end
  if changed and persist then
    redis.call('HSET', key, 'tier', p.tier, 'flagged', p.flagged and fmt(p.flagged) or '')
    if not p.up_at then
      redis.call('HDEL', key, 'up_at', 'up_from')
    end
  end
end

-- The projection index (docs/internals.md, "Redis key schema"): who got a new slot in the
-- trailing 30 days and when, kept as two halves, each built for its readers, at under 32 B a user
-- where one sorted set of both took ~110 (BENCHMARKS.md, "The projection index at steady state").
-- * By user, at the base key: a set in parts (sset_*), recipient -> time (ms). It gives a
--   returning user's previous time, a release's check, and the planner's list.
-- * By time: the times alone, in two-hour buckets. Each bucket is a string of 3-byte big-endian
--   offsets into its two hours, sorted (base .. ':t:' .. bucket number). A hash (base .. ':t')
--   holds each bucket's count and two cursors, one per trailing window (7 and 30 days). A cursor is a
--   boundary `b`, how many values of b's bucket are at or before it (`i`), and how many values
--   lie after it (`a`: the count a projection reads). A change of a value moves the cursors'
--   figures; moving a cursor reads only the values it passes and the counts of the buckets it
--   skips. So the counts are exact to the millisecond, and no call scans the index.
-- A bucket lives until its last possible value leaves the 30 days; the hash outlives every
-- bucket, and drops the counts of buckets wholly past 30 days when a new bucket opens.
-- Two hours fit a 3-byte offset (2^24 ms is 4.66 h); wider buckets are fewer keys (each costs
-- ~140 B, which a sender meeting few users a day feels), narrower ones shorter strings to splice
-- (BENCHMARKS.md, "The projection index at steady state").
local UT_BUCKET_MS = 7200000
local UT_W = 3
local UT_FMT = '>I3'
-- The trailing windows counted: their span, and their cursor's fields in the hash.
local UT_WINDOWS = {
  { span = WEEK_MS, b = 'b7', i = 'i7', a = 'a7' },
  { span = MONTH_MS, b = 'b30', i = 'i30', a = 'a30' },
}
-- Values a cursor reads in its first GETRANGE when it moves forward (a step past them reads the
-- rest of its bucket at once).
local UT_CHUNK = 16

local function ut_bucket(t)
  return math.floor(t / UT_BUCKET_MS)
end

local function ut_key(T, b)
  return T.h .. ':' .. fmt(b)
end

-- Reads the hash: the cursors (a new index starts them at `now`, with nothing on either side),
-- the latest time, and the count of the bucket of `now`, where a new user goes.
local function ut_open(base, now)
  local h = base .. ':t'
  local bn = ut_bucket(now)
  local f = redis.call('HMGET', h, 'b7', 'i7', 'a7', 'b30', 'i30', 'a30', 'mx', fmt(bn))
  local T = { h = h, cnt = { [bn] = tonumber(f[8] or '0') }, put = {}, cur = {}, mx = tonumber(f[7] or '') }
  T.mx0, T.fresh = T.mx, not f[1]
  for j, w in ipairs(UT_WINDOWS) do
    local C
    if f[1] then
      local at = (j - 1) * 3
      C = { w = w, b = tonumber(f[at + 1]), i = tonumber(f[at + 2]), a = tonumber(f[at + 3]) }
    else
      C = { w = w, b = now - w.span, i = 0, a = 0, moved = true }
    end
    C.a0 = C.a
    T.cur[j] = C
  end
  return T
end

-- The counts of buckets lo..hi into T.cnt (one HMGET per 512 not yet read).
local function ut_counts(T, lo, hi)
  for s = lo, hi, 512 do
    local want = {}
    for b = s, math.min(hi, s + 511) do
      if T.cnt[b] == nil then
        want[#want + 1] = b
      end
    end
    if #want > 0 then
      local names = {}
      for j, b in ipairs(want) do
        names[j] = fmt(b)
      end
      for j, c in ipairs(redis.call('HMGET', T.h, unpack(names))) do
        T.cnt[want[j]] = tonumber(c or '0')
      end
    end
  end
end

local function ut_count(T, b)
  local c = T.cnt[b]
  if c == nil then
    c = tonumber(redis.call('HGET', T.h, fmt(b)) or '0')
    T.cnt[b] = c
  end
  return c
end

-- The values at positions from..from+n-1 (0-based) of bucket b, as times (ms).
local function ut_values(T, b, from, n)
  local s = redis.call('GETRANGE', ut_key(T, b), fmt(from * UT_W), fmt((from + n) * UT_W - 1))
  local out = {}
  for p = 1, #s - UT_W + 1, UT_W do
    out[#out + 1] = b * UT_BUCKET_MS + struct.unpack(UT_FMT, s, p)
  end
  return out
end

-- In a bucket's string, the first position whose offset is >= x (> x with `after`).
local function ut_search(s, x, after)
  local lo, hi = 0, #s / UT_W
  while lo < hi do
    local mid = math.floor((lo + hi) / 2)
    local v = struct.unpack(UT_FMT, s, mid * UT_W + 1)
    if v < x or (after and v == x) then
      lo = mid + 1
    else
      hi = mid
    end
  end
  return lo
end

-- `d` values equal to v came (d > 0) or went (d < 0): the bucket's count, and each cursor's
-- figures (a value after the boundary is counted in `a`; one at or before it, in b's bucket, in
-- `i`).
local function ut_note(T, v, d)
  local b = ut_bucket(v)
  T.cnt[b] = ut_count(T, b) + d
  T.put[b] = true
  for _, C in ipairs(T.cur) do
    if v > C.b then
      C.a = C.a + d
    elseif b == ut_bucket(C.b) then
      C.i, C.moved = C.i + d, true
    end
  end
end

-- Adds n values equal to v: appended when no stored value is later (the common case: new users
-- at the present), otherwise spliced in at its place. A bucket created is given its TTL here.
local function ut_add(T, v, n, now, slack)
  local b = ut_bucket(v)
  local key = ut_key(T, b)
  local piece = string.rep(struct.pack(UT_FMT, v - b * UT_BUCKET_MS), n)
  local len
  if not T.mx or v >= T.mx then
    len = redis.call('APPEND', key, piece)
  else
    local s = redis.call('GET', key) or ''
    local j = ut_search(s, v - b * UT_BUCKET_MS, true) * UT_W
    s = string.sub(s, 1, j) .. piece .. string.sub(s, j + 1)
    redis.call('SET', key, s, 'KEEPTTL')
    len = #s
  end
  if len == #piece then
    keep(key, (b + 1) * UT_BUCKET_MS + MONTH_MS, now, slack)
    T.grew = true
  end
  T.mx = math.max(T.mx or v, v)
  ut_note(T, v, n)
end

-- Removes one value per entry of `vs` (times, ms), where stored; a value no longer stored (its
-- bucket expired) is skipped. One GET and one SET per bucket touched.
local function ut_drop(T, vs)
  local by = {}
  for _, v in ipairs(vs) do
    local b = ut_bucket(v)
    by[b] = by[b] or {}
    table.insert(by[b], v - b * UT_BUCKET_MS)
  end
  for b, offs in pairs(by) do
    local key = ut_key(T, b)
    local s = redis.call('GET', key)
    if s then
      table.sort(offs)
      local cut, last = {}, -1
      for _, off in ipairs(offs) do
        local p = math.max(ut_search(s, off, false), last + 1)
        if p < #s / UT_W and struct.unpack(UT_FMT, s, p * UT_W + 1) == off then
          cut[#cut + 1], last = p, p
          ut_note(T, b * UT_BUCKET_MS + off, -1)
        end
      end
      if #cut > 0 then
        local parts, from = {}, 1
        for _, p in ipairs(cut) do
          parts[#parts + 1] = string.sub(s, from, p * UT_W)
          from = (p + 1) * UT_W + 1
        end
        parts[#parts + 1] = string.sub(s, from)
        local rest = table.concat(parts)
        if rest == '' then
          redis.call('DEL', key)
        else
          redis.call('SET', key, rest, 'KEEPTTL')
        end
      end
    end
  end
end

-- Moves cursor C to the boundary B.
local function ut_seek(T, C, B)
  if B == C.b then
    return
  end
  local from, to = ut_bucket(C.b), ut_bucket(B)
  if B > C.b and (not T.mx or B >= T.mx) then
    -- Every value is at or before B.
    C.b, C.a, C.i, C.moved = B, 0, ut_count(T, to), true
    return
  end
  if to ~= from then
    local lo, hi = math.min(from, to) + 1, math.max(from, to) - 1
    ut_counts(T, lo, hi)
    local skipped = 0
    for b = lo, hi do
      skipped = skipped + T.cnt[b]
    end
    if to > from then
      C.a = C.a - (ut_count(T, from) - C.i) - skipped
      C.i = 0
    else
      C.a = C.a + C.i + skipped
      C.i = ut_count(T, to)
    end
  end
  if B > C.b then
    -- Forward: the values from i on that are at or before B. Mostly a few, in the first chunk;
    -- past it (a long step), the rest of the bucket in one read, searched here.
    local vs = ut_values(T, to, C.i, UT_CHUNK)
    local k = 0
    while k < #vs and vs[k + 1] <= B do
      k = k + 1
    end
    if k == UT_CHUNK then
      local rest = redis.call('GETRANGE', ut_key(T, to), fmt((C.i + k) * UT_W), '-1')
      k = k + ut_search(rest, B - to * UT_BUCKET_MS, true)
    end
    C.i, C.a = C.i + k, C.a - k
  elseif C.i > 0 then
    -- Backward (a clock behind): the values before i that are after B, in one read, searched.
    local head = redis.call('GETRANGE', ut_key(T, to), '0', fmt(C.i * UT_W - 1))
    -- A bucket already expired (a clock far behind) reads empty: its values stay counted before.
    if #head == C.i * UT_W then
      local k = C.i - ut_search(head, B - to * UT_BUCKET_MS, true)
      C.i, C.a = C.i - k, C.a + k
    end
  end
  C.b, C.moved = B, true
end

-- Both cursors to `now`: after this, T.cur[1].a and T.cur[2].a are the users of the trailing 7
-- and 30 days.
local function ut_seek_all(T, now)
  for _, C in ipairs(T.cur) do
    ut_seek(T, C, now - C.w.span)
  end
end

-- The k-th value after C's boundary (a time, ms), or nil when fewer are.
local function ut_kth(T, C, k)
  if k < 1 or C.a < k then
    return nil
  end
  local b, last = ut_bucket(C.b), ut_bucket(T.mx)
  local first = C.i
  local here = ut_count(T, b) - first
  while k > here do
    k = k - here
    b = b + 1
    if b > last then
      return nil
    end
    ut_counts(T, b, math.min(b + 63, last))
    first, here = 0, T.cnt[b]
  end
  return ut_values(T, b, first + k - 1, 1)[1]
end

-- Writes what changed: the counts (a bucket emptied loses its count) and the cursors. When a
-- bucket opened (every two hours under traffic), the counts of buckets wholly past 30 days are
-- dropped, and the hash is kept alive as long as that bucket.
local function ut_save(T, now, slack)
  if T.fresh and not T.mx then
    -- Nothing stored, nothing to count: no hash (it would have no TTL).
    return
  end
  if T.grew then
    ut_seek_all(T, now)
    -- A bucket's margin, so a clock a little behind (another worker's) finds its counts.
    local stop = ut_bucket(T.cur[2].b) - 1
    -- The previous opening dropped those below its own stop, at least the bucket of the latest
    -- time then stored, less 30 days and two buckets; so only the buckets since are left.
    if T.mx0 then
      local gone = {}
      for b = math.max(ut_bucket(T.mx0 - MONTH_MS) - 2, stop - 4096), stop - 1 do
        gone[#gone + 1] = fmt(b)
        T.put[b] = nil
      end
      chunked('HDEL', T.h, gone, 512)
    end
  end
  -- Only what changed: a new user moves its bucket's count, the `a` of each cursor, and `mx`.
  local h, del = {}, {}
  for b in pairs(T.put) do
    if T.cnt[b] > 0 then
      h[#h + 1] = fmt(b)
      h[#h + 1] = fmt(T.cnt[b])
    else
      del[#del + 1] = fmt(b)
    end
  end
  for _, C in ipairs(T.cur) do
    if C.moved then
      h[#h + 1] = C.w.b
      h[#h + 1] = fmt(C.b)
      h[#h + 1] = C.w.i
      h[#h + 1] = fmt(C.i)
    end
    if C.moved or C.a ~= C.a0 then
      h[#h + 1] = C.w.a
      h[#h + 1] = fmt(C.a)
    end
  end
  if T.mx ~= T.mx0 then
    h[#h + 1] = 'mx'
    h[#h + 1] = fmt(T.mx)
  end
  if #h > 0 then
    redis.call('HSET', T.h, unpack(h))
  end
  if #del > 0 then
    redis.call('HDEL', T.h, unpack(del))
  end
  if T.grew or (T.fresh and T.mx) then
    extend(T.h, (ut_bucket(T.mx) + 1) * UT_BUCKET_MS + MONTH_MS, now, slack)
  end
end

-- GCRA: returns the new TAT, or nil and the wait in ms (rounded up).
-- mirrors rules::rates::gcra
local function gcra(tat, now_us, interval, burst)
  local new_tat = math.max(tat, now_us) + interval
  local over = new_tat - now_us - burst * interval
  if over > 0 then
    return nil, math.floor((over + 999) / 1000)
  end
  return new_tat
end

-- When the count of unique users reached the bar for the next tier, re-derived from the users
-- still counted: the threshold-th in the trailing window (T from ut_open). nil: not reached.
-- mirrors rules::projections::crossing_time
local function crossing_time(T, rules, tier, now)
  local limit = TIER_LIMIT[tier]
  if limit == 0 then
    return nil
  end
  ut_seek_all(T, now)
  local best
  if not (rules == 'legacy' and tier == '50') then
    best = ut_kth(T, T.cur[1], math.floor(limit / 2))
  end
  if rules == 'portfolio' and tier == '250' then
    local t = ut_kth(T, T.cur[2], PORTFOLIO_ENTRY_UNIQUES)
    if t and (not best or t < best) then
      best = t
    end
  end
  return best
end

-- Frees a slot opened by `resv` ("<opened>.<seq>") while no later counted delivery touched it:
-- the window entry, the opener's entry in a portfolio's per-sender index, and its count in the
-- projections (the user's previous unique time comes back; a pending upgrade is re-derived
-- without it). The slot is identified by its sequence, unique in the window's life; the opening
-- time comes from the token. Returns true when released; the caller saves W.
-- mirrors the memory ledger's State::release_slot; its re-projection (after the uniques are
-- restored) mirrors rules::projections::reproject_after_release
local function release_slot(W, uq, ws_prefix, r, resv, now, polkey, dtier, drules)
  local e = win_expiry(W, r)
  if not e or e <= now then
    return false
  end
  local v = win_value(W, r)
  local dot = string.find(resv, '.', 1, true)
  if not v or not dot then
    return false
  end
  local opened, rseq = string.sub(resv, 1, dot - 1), string.sub(resv, dot + 1)
  local seq, touched, prev, opener = slot_split(v)
  if seq ~= win_rel_seq(W, rseq) or touched ~= '0' then
    return false
  end
  win_remove(W, r)
  if ws_prefix ~= '' then
    redis.call('ZREM', ws_prefix .. opener, r)
  end
  local got = {}
  local S = sset_scores(uq, { r }, got)
  local u = got[r]
  if u and u == tonumber(opened) then
    local T = ut_open(uq, now)
    ut_drop(T, { u })
    local part = sset_part(uq, sset_part_of(S, r))
    if prev == '' then
      redis.call('ZREM', part, r)
    else
      redis.call('ZADD', part, prev, r)
      -- A time already past 30 days counts for nothing again: the by-time half keeps only
      -- the times that may count.
      if tonumber(prev) > now - MONTH_MS then
        -- A release carries no TTL slack of its own: a bucket it recreates gets RENEW_MS (an
        -- hour, the service's default slack), so a worker a little behind still finds it.
        ut_add(T, tonumber(prev), 1, now, RENEW_MS)
      end
    end
    local f = redis.call('HMGET', polkey, 'up_at', 'up_from', 'tier', 'rules')
    local tier, rules = f[3] or dtier, f[4] or drules
    if f[1] and f[2] == tier then
      local t = crossing_time(T, rules, tier, now)
      if t then
        redis.call('HSET', polkey, 'up_at', fmt(t + UPGRADE_DELAY_MS[rules]))
      else
        redis.call('HDEL', polkey, 'up_at', 'up_from')
      end
    end
    ut_save(T, now, RENEW_MS)
  end
  return true
end

-- Does the count of unique users cross the bar for the next tier?
-- mirrors rules::projections::upgrade_threshold_met
local function upgrade_threshold_met(rules, tier, u7, u30)
  local limit = TIER_LIMIT[tier]
  if limit == 0 then
    return false
  end
  local half = math.floor(limit / 2)
  if rules == 'legacy' then
    return tier ~= '50' and u7 >= half
  end
  return u7 >= half or (tier == '250' and u30 >= PORTFOLIO_ENTRY_UNIQUES)
end


-- The ledger marker (docs/contract.md, "A lost ledger"): "1" while the ledger is whole,
-- "lost <ms>" once it was found gone. Every instance creates it on first contact (SET NX), so a
-- marker that is missing later means the data under it went away (a restart without
-- persistence, a failover to an empty replica, FLUSHALL). mode "d" (deny_new) records the loss
-- and keeps it until an operator accepts it or one window (slot_ms) has passed; mode "a"
-- (allow) only reports it. Returns whether this call found the loss, and since when new slots
-- are refused (nil when they are not).
-- `mark`: the marker when the caller already read it (false when absent).
local function ledger_check(key, mode, now, slot_ms, write, mark)
  if mark == nil then
    mark = redis.call('GET', key)
  end
  if mark == '1' then
    return false, nil
  end
  if not mark then
    if mode == 'a' then
      if write then
        redis.call('SET', key, '1')
      end
      return true, nil
    end
    if write then
      redis.call('SET', key, 'lost ' .. fmt(now))
    end
    return true, now
  end
  local since = tonumber(string.sub(mark, 6)) or now
  if mode == 'a' or now >= since + slot_ms then
    if write then
      redis.call('SET', key, '1')
    end
    return false, nil
  end
  return false, since
end
