-- Acquire or renew the scheduler lease.
-- KEYS: 1 lease, 2 epoch counter
-- ARGV: 1 current token ('' when not holding), 2 ttl ms, 3 '1' to renew only (never acquire anew)
-- Returns the token held after the call, or false when we do not hold it.
local cur = redis.call('GET', KEYS[1])
if cur and cur == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return cur
end
if cur or ARGV[3] == '1' then
  return false
end
local token = tostring(redis.call('INCR', KEYS[2]))
redis.call('SET', KEYS[1], token, 'PX', ARGV[2])
return token
