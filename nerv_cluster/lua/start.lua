-- A worker claims attempts before running them, and records TASK_STARTED for each it may run.
-- First it records the outcomes of the attempts it ran before (as finish.lua does, each once): a packed
-- batch claims each job when it starts, and the same round trip carries the outcomes of the jobs
-- before it, so a job costs one round trip and a batch never holds claims on jobs it has not started.
-- Per attempt the verdict is 'done' when it already has an outcome (a redelivery, or superseded: do not
-- run it), 'busy' when another live worker process holds it, 'poison' when processes holding it died
-- too often (the caller records the failure), 'ok' when this worker may run it.
-- KEYS: 1 feed, then per outcome: run log, outcomes hash; then per attempt: run log, outcomes hash,
--       claims hash
-- ARGV: 1 worker id, 2 heartbeat key prefix, 3 feed maxlen, 4 max takeovers, 5 number of outcomes n,
--       then per outcome: field (task:attempt), outcome (event type), channel, event JSON;
--       then per attempt: field (task:attempt), channel, TASK_STARTED event JSON
local n = tonumber(ARGV[5])
for i = 0, n - 1 do
  local log, outcomes = KEYS[2 + 2 * i], KEYS[3 + 2 * i]
  local field, outcome, channel, event = ARGV[6 + 4 * i], ARGV[7 + 4 * i], ARGV[8 + 4 * i], ARGV[9 + 4 * i]
  if redis.call('HSETNX', outcomes, field, outcome) == 1 then
    redis.call('XADD', log, '*', 'e', event)
    redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[3], '*', 'e', event)
    redis.call('PUBLISH', channel, event)
  end
end
local kbase, abase = 1 + 2 * n, 5 + 4 * n
local verdicts = {}
for i = 0, (#ARGV - abase) / 3 - 1 do
  local log, outcomes, claims = KEYS[kbase + 1 + 3 * i], KEYS[kbase + 2 + 3 * i], KEYS[kbase + 3 + 3 * i]
  local field, channel, event = ARGV[abase + 1 + 3 * i], ARGV[abase + 2 + 3 * i], ARGV[abase + 3 + 3 * i]
  local verdict = 'ok'
  if redis.call('HEXISTS', outcomes, field) == 1 then
    verdict = 'done'
  else
    local holder = redis.call('HGET', claims, field)
    if holder and holder ~= ARGV[1] then
      if redis.call('EXISTS', ARGV[2] .. holder) == 1 then
        verdict = 'busy'
      elseif redis.call('HINCRBY', claims, field .. '#lost', 1) >= tonumber(ARGV[4]) then
        -- The holders died without an outcome too often.
        verdict = 'poison'
      end
    end
  end
  if verdict == 'ok' then
    redis.call('HSET', claims, field, ARGV[1])
    redis.call('XADD', log, '*', 'e', event)
    redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[3], '*', 'e', event)
    redis.call('PUBLISH', channel, event)
  end
  verdicts[#verdicts + 1] = verdict
end
return verdicts
