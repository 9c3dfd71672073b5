-- move.lua: the journal of a sender's reassignment (AssignSender), in the sender's own slot.
-- Moves of one sender never interleave, and an interrupted one is completed by the next
-- AssignSender of that sender (every step of a move is idempotent: move_out, move_in).
--
-- KEYS[1] journal  string "<from>><to>><started ms>><mover>" (portfolio ids, "" = the sender's
--                  own home; Redis TIME; the instance that runs the move) while a move is under
--                  way; absent otherwise
-- KEYS[2] away     string the portfolio the sender is assigned to (absent: unassigned)
-- ARGV[1] mode "begin" | "finish"
-- ARGV[2] begin: the portfolio it moves to ("" = its own home); finish: the journal entry
-- ARGV[3] begin: the id of the instance that begins the move
-- Returns for "begin": {"busy", journal, age ms} when a move is under way (the caller completes
-- it only when it is old enough to have been abandoned), {"same"} when the sender is already
-- there, or {"begun", journal} after writing it;
-- for "finish": {1} (the entry is removed if it is still the one given).

if ARGV[1] == 'finish' then
  if redis.call('GET', KEYS[1]) == ARGV[2] then
    redis.call('DEL', KEYS[1])
  end
  return { 1 }
end
local now = clock('')
local journal = redis.call('GET', KEYS[1])
if journal then
  local started = tonumber(string.match(journal, '^[^>]*>[^>]*>(%d+)') or '') or 0
  return { 'busy', journal, now - started }
end
local from = redis.call('GET', KEYS[2]) or ''
if from == ARGV[2] then
  return { 'same' }
end
local entry = from .. '>' .. ARGV[2] .. '>' .. fmt(now) .. '>' .. ARGV[3]
redis.call('SET', KEYS[1], entry)
return { 'begun', entry }
