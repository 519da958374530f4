-- Accept a new run atomically: register it, write its first event to its log and to the feed, announce it.
-- KEYS: 1 run log, 2 feed, 3 active-runs set, 4 all-runs zset
-- ARGV: 1 run id, 2 channel, 3 event JSON, 4 submit time (score), 5 feed maxlen
if redis.call('EXISTS', KEYS[1]) == 1 then
  return redis.error_reply('RUN_EXISTS run ' .. ARGV[1] .. ' was already submitted')
end
redis.call('SADD', KEYS[3], ARGV[1])
redis.call('ZADD', KEYS[4], ARGV[4], ARGV[1])
redis.call('XADD', KEYS[1], '*', 'e', ARGV[3])
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[5], '*', 'e', ARGV[3])
redis.call('PUBLISH', ARGV[2], ARGV[3])
return 1
