-- Acquire or renew the scheduler lease.
-- KEYS: 1 lease, 2 epoch counter
-- ARGV: 1 current token ('' when not holding), 2 ttl ms
-- Returns the token held after the call, or false when another holder has it.
local cur = redis.call('GET', KEYS[1])
if cur and cur == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return cur
end
if cur then
  return false
end
local token = tostring(redis.call('INCR', KEYS[2]))
redis.call('SET', KEYS[1], token, 'PX', ARGV[2])
return token
