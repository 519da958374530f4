-- The scheduler hands jobs to worker processes that wait for them, claiming each attempt for its
-- worker (the worker runs a handed job without claiming it again). Fenced like every scheduler write.
-- A worker is handed at most one job per wait: its waiting flag (set by finish.lua with the outcome
-- that says it waits) is consumed here; a worker that stopped waiting deleted it (resign.lua), and
-- then the job is not handed (0) and the scheduler sends it through Celery.
-- KEYS: 1 lease, then per hand-off: waiting flag, hand-off list, run log, claims hash
-- ARGV: 1 token, 2 list ttl ms, then per hand-off: field (task:attempt), worker id, channel,
--       TASK_STARTED event JSON, job JSON
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return redis.error_reply('LEASE_LOST the scheduler lease is held by another token')
end
local out = {}
for i = 0, (#KEYS - 1) / 4 - 1 do
  local waiting, list, log, claims = KEYS[2 + 4 * i], KEYS[3 + 4 * i], KEYS[4 + 4 * i], KEYS[5 + 4 * i]
  local field, worker, channel, started, job =
    ARGV[3 + 5 * i], ARGV[4 + 5 * i], ARGV[5 + 5 * i], ARGV[6 + 5 * i], ARGV[7 + 5 * i]
  if redis.call('DEL', waiting) == 1 then
    redis.call('HSET', claims, field, worker)
    redis.call('XADD', log, '*', 'e', started)
    redis.call('PUBLISH', channel, started)
    redis.call('RPUSH', list, job)
    redis.call('PEXPIRE', list, ARGV[2])
    out[#out + 1] = 1
  else
    out[#out + 1] = 0
  end
end
return out
