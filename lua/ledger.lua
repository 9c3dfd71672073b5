-- ledger.lua: the health probe's look at the ledger marker (lib.lua, ledger_check), so a loss
-- is found within a second even when no decision runs; or, for "accept", an operator's word
-- that the ledger may be trusted again (docs/contract.md, "A lost ledger").
--
-- KEYS[1] ledger marker string "1", or "lost <ms>"
-- ARGV[1] now (ms), or "" for Redis TIME
-- ARGV[2] "d" (deny_new) or "a" (allow) to check; "accept" to mark the ledger whole
-- ARGV[3] slot length (ms)
-- Returns {1 when this call found the ledger lost else 0, new slots refused since (ms)|-1};
-- for "accept", {1 when it was lost else 0, since when (ms)|-1}.

local now = clock(ARGV[1])
if ARGV[2] == 'accept' then
  local mark = redis.call('GET', KEYS[1])
  redis.call('SET', KEYS[1], '1')
  if mark and mark ~= '1' then
    return { 1, tonumber(string.sub(mark, 6)) or -1 }
  end
  return { 0, -1 }
end
local lost_now, since = ledger_check(KEYS[1], ARGV[2], now, tonumber(ARGV[3]), true)
return { lost_now and 1 or 0, since or -1 }
