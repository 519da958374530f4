-- Append events of one run to its log and to the scheduler feed, and announce them.
-- Fixed keys and arguments: see nerv_cluster/scripts.py (Append); the tail: the event JSONs.
for i = NARGV + 1, #ARGV do
  redis.call('XADD', run_log, '*', 'e', ARGV[i])
  redis.call('XADD', feed, 'MAXLEN', '~', feed_maxlen, '*', 'e', ARGV[i])
  redis.call('PUBLISH', channel, ARGV[i])
end
return #ARGV - NARGV
