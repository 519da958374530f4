-- Record an attempt's outcome once: a second outcome for the same attempt is dropped.
-- KEYS: 1 run log, 2 feed, 3 outcomes hash
-- ARGV: 1 field (task:attempt), 2 outcome (event type), 3 channel, 4 event JSON, 5 feed maxlen
if redis.call('HSETNX', KEYS[3], ARGV[1], ARGV[2]) == 0 then
  return 0
end
redis.call('XADD', KEYS[1], '*', 'e', ARGV[4])
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[5], '*', 'e', ARGV[4])
redis.call('PUBLISH', ARGV[3], ARGV[4])
return 1
