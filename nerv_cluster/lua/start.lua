-- A worker claims attempts before running them, and records TASK_STARTED for each it may run.
-- Per attempt the verdict is 'done' when it already has an outcome (a redelivery, or superseded: do not
-- run it), 'busy' when another live worker process holds it, 'poison' when processes holding it died
-- too often (the caller records the failure), 'ok' when this worker may run it.
-- KEYS: 1 feed, then per attempt: run log, outcomes hash, claims hash
-- ARGV: 1 worker id, 2 heartbeat key prefix, 3 feed maxlen, 4 max takeovers,
--       then per attempt: field (task:attempt), channel, TASK_STARTED event JSON
local verdicts = {}
for i = 0, (#ARGV - 4) / 3 - 1 do
  local log, outcomes, claims = KEYS[2 + 3 * i], KEYS[3 + 3 * i], KEYS[4 + 3 * i]
  local field, channel, event = ARGV[5 + 3 * i], ARGV[6 + 3 * i], ARGV[7 + 3 * i]
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
