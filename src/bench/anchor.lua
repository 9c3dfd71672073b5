-- The anchor of `waquota bench --anchor-redis` (src/bench/anchor.rs), also driven as a function
-- by scripts/layout-floor: the simplest exact sliding window, one sorted set per sender.
-- KEYS[1] a sorted set of the sender's recipients, scored by when each was counted;
-- ARGV now (ms), window (ms), limit, recipient. {1} already counted, {2} newly counted,
-- {0, oldest score} refused.
local key, now, window, limit, member = KEYS[1], tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4]
redis.call('ZREMRANGEBYSCORE', key, '-inf', now - window)
if redis.call('ZSCORE', key, member) then return {1} end
if redis.call('ZCARD', key) < limit then
  redis.call('ZADD', key, now, member); redis.call('PEXPIRE', key, window); return {2}
end
return {0, redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')[2]}
