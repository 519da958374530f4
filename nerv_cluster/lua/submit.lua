-- Accept a new run atomically: register it, write its first event to its log and to the feed, announce it.
-- Keys and arguments: see nerv_cluster/scripts.py (Submit), which binds them to the locals used here.
if redis.call('EXISTS', run_log) == 1 then
  return redis.error_reply('RUN_EXISTS run ' .. run_id .. ' was already submitted')
end
redis.call('SADD', active, run_id)
redis.call('ZADD', runs, submitted_at, run_id)
redis.call('XADD', run_log, '*', 'e', event)
redis.call('XADD', feed, 'MAXLEN', '~', feed_maxlen, '*', 'e', event)
redis.call('PUBLISH', channel, event)
return 1
