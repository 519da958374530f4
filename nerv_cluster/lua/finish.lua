-- Record attempts' outcomes, each once: a second outcome for the same attempt is dropped.
-- KEYS: 1 feed, then per attempt: run log, outcomes hash
-- ARGV: 1 feed maxlen, 2 waiting flag key or '', 3 its ttl ms,
--       then per attempt: field (task:attempt), outcome (event type), channel, event JSON
-- Returns one 1/0 per attempt: 1 when recorded.
-- With a waiting flag, the worker waits for a hand-off (fenced_append.lua) after the last attempt: the flag is
-- set only if that outcome was recorded, since only a recorded outcome can lead the scheduler to it.
local out = {}
for i = 0, (#ARGV - 3) / 4 - 1 do
  local log, outcomes = KEYS[2 + 2 * i], KEYS[3 + 2 * i]
  local field, outcome, channel, event = ARGV[4 + 4 * i], ARGV[5 + 4 * i], ARGV[6 + 4 * i], ARGV[7 + 4 * i]
  if redis.call('HSETNX', outcomes, field, outcome) == 1 then
    redis.call('XADD', log, '*', 'e', event)
    redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*', 'e', event)
    redis.call('PUBLISH', channel, event)
    out[#out + 1] = 1
  else
    out[#out + 1] = 0
  end
end
if ARGV[2] ~= '' and out[#out] == 1 then
  redis.call('SET', ARGV[2], '1', 'PX', ARGV[3])
end
return out
