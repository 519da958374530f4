-- Record attempts' outcomes, each once: a second outcome for the same attempt is dropped.
-- The outcome slot (the outcomes hash) is taken here, and the event goes to the feed only, with the
-- attempt's claim token in a field of its own ('t'): the scheduler checks it and transcribes the event
-- into the run's log (a worker writes no run log: README.md#security). No MAXLEN: see start.lua.
-- Fixed keys and arguments: see nerv_cluster/scripts.py (Finish); the tail: per attempt, key outcomes
-- hash, arguments field (task:attempt), outcome (event type), event JSON, token.
-- Returns one 1/0 per attempt: 1 when recorded.
-- With a waiting flag, the worker waits for a hand-off (fenced_append.lua) after the last attempt: the flag is
-- set only if that outcome was recorded, since only a recorded outcome can lead the scheduler to it. Its value
-- is the claim that outcome names for the job to be handed (the hand-off must carry that claim).
local out = {}
for i = 0, (#ARGV - NARGV) / 4 - 1 do
  local outcomes = KEYS[NKEYS + 1 + i]
  local a = NARGV + 1 + 4 * i
  local field, outcome, event, tok = ARGV[a], ARGV[a + 1], ARGV[a + 2], ARGV[a + 3]
  if redis.call('HSETNX', outcomes, field, outcome) == 1 then
    redis.call('XADD', feed, '*', 'e', event, 't', tok)
    out[#out + 1] = 1
  else
    out[#out + 1] = 0
  end
end
if waiting ~= '' and out[#out] == 1 then
  redis.call('SET', waiting, waiting_claim, 'PX', waiting_ttl_ms)
end
return out
