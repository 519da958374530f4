-- A worker claims an attempt before running it, and records TASK_STARTED.
-- Returns 'done' when the attempt already has an outcome (a redelivery, or superseded: do not run it),
-- 'busy' when another live worker process holds the claim, 'poison' when processes holding it died
-- too often (the caller records the failure), 'ok' when this worker may run it.
-- KEYS: 1 run log, 2 feed, 3 outcomes hash, 4 claims hash
-- ARGV: 1 field (task:attempt), 2 worker id, 3 heartbeat key prefix, 4 channel, 5 event JSON,
--       6 feed maxlen, 7 max takeovers
if redis.call('HEXISTS', KEYS[3], ARGV[1]) == 1 then
  return 'done'
end
local holder = redis.call('HGET', KEYS[4], ARGV[1])
if holder and holder ~= ARGV[2] then
  if redis.call('EXISTS', ARGV[3] .. holder) == 1 then
    return 'busy'
  end
  -- The holder died without an outcome: take over, counting how often that happened.
  if redis.call('HINCRBY', KEYS[4], ARGV[1] .. '#lost', 1) >= tonumber(ARGV[7]) then
    return 'poison'
  end
end
redis.call('HSET', KEYS[4], ARGV[1], ARGV[2])
redis.call('XADD', KEYS[1], '*', 'e', ARGV[5])
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[6], '*', 'e', ARGV[5])
redis.call('PUBLISH', ARGV[4], ARGV[5])
return 'ok'
