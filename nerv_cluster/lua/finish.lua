-- Record attempts' outcomes, each once: a second outcome for the same attempt is dropped.
-- KEYS: 1 feed, then per attempt: run log, outcomes hash
-- ARGV: 1 feed maxlen, then per attempt: field (task:attempt), outcome (event type), channel, event JSON
-- Returns one 1/0 per attempt: 1 when recorded.
local out = {}
for i = 0, (#ARGV - 1) / 4 - 1 do
  local log, outcomes = KEYS[2 + 2 * i], KEYS[3 + 2 * i]
  local field, outcome, channel, event = ARGV[2 + 4 * i], ARGV[3 + 4 * i], ARGV[4 + 4 * i], ARGV[5 + 4 * i]
  if redis.call('HSETNX', outcomes, field, outcome) == 1 then
    redis.call('XADD', log, '*', 'e', event)
    redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*', 'e', event)
    redis.call('PUBLISH', channel, event)
    out[#out + 1] = 1
  else
    out[#out + 1] = 0
  end
end
return out
