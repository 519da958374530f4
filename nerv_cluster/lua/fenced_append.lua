-- The scheduler's writes: only while it holds the lease (the fencing token must match).
-- Decisions go to the run logs only: the scheduler made them, so it needs no feed copy.
-- KEYS: 1 lease, 2.. run logs
-- ARGV: 1 token, then triples (index into KEYS, channel or '' for none, event JSON)
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return redis.error_reply('LEASE_LOST the scheduler lease is held by another token')
end
local n = 0
for i = 2, #ARGV, 3 do
  local key = KEYS[tonumber(ARGV[i])]
  redis.call('XADD', key, '*', 'e', ARGV[i + 2])
  if ARGV[i + 1] ~= '' then
    redis.call('PUBLISH', ARGV[i + 1], ARGV[i + 2])
  end
  n = n + 1
end
return n
