-- Append events of one run to its log and to the scheduler feed, and announce them.
-- KEYS: 1 run log, 2 feed
-- ARGV: 1 channel, 2 feed maxlen, 3.. event JSONs
for i = 3, #ARGV do
  redis.call('XADD', KEYS[1], '*', 'e', ARGV[i])
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[2], '*', 'e', ARGV[i])
  redis.call('PUBLISH', ARGV[1], ARGV[i])
end
return #ARGV - 2
