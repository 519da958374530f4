-- A worker claims attempts before running them, and records TASK_STARTED for each it may run.
-- Per attempt the verdict is 'done' when it already has an outcome (a redelivery, or superseded: do not
-- run it), 'busy' when another live worker process holds it, 'poison' when processes holding it died
-- too often (the caller records the failure), 'ok' when this worker may run it.
-- Fixed keys and arguments: see nerv_cluster/scripts.py (Start); the tail: per attempt, keys run log,
-- outcomes hash, claims hash, arguments field (task:attempt), channel, TASK_STARTED event JSON.
local verdicts = {}
for i = 0, (#ARGV - NARGV) / 3 - 1 do
  local log, outcomes, claims = KEYS[NKEYS + 1 + 3 * i], KEYS[NKEYS + 2 + 3 * i], KEYS[NKEYS + 3 + 3 * i]
  local a = NARGV + 1 + 3 * i
  local field, chan, event = ARGV[a], ARGV[a + 1], ARGV[a + 2]
  local verdict = 'ok'
  if redis.call('HEXISTS', outcomes, field) == 1 then
    verdict = 'done'
  else
    local holder = redis.call('HGET', claims, field)
    if holder and holder ~= worker then
      if redis.call('EXISTS', heartbeat_prefix .. holder) == 1 then
        verdict = 'busy'
      elseif redis.call('HINCRBY', claims, field .. '#lost', 1) >= tonumber(max_takeovers) then
        -- The holders died without an outcome too often.
        verdict = 'poison'
      end
    end
  end
  if verdict == 'ok' then
    redis.call('HSET', claims, field, worker)
    redis.call('XADD', log, '*', 'e', event)
    redis.call('XADD', feed, 'MAXLEN', '~', feed_maxlen, '*', 'e', event)
    redis.call('PUBLISH', chan, event)
  end
  verdicts[#verdicts + 1] = verdict
end
return verdicts
