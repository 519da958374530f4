-- Acquire or renew the scheduler lease. Keys and arguments: see nerv_cluster/scripts.py (Lease):
-- token is the one we hold ('' when none), renew_only '1' to renew only (never acquire anew).
-- Returns the token held after the call, or false when we do not hold it.
local cur = redis.call('GET', lease)
if cur and cur == token then
  redis.call('PEXPIRE', lease, ttl_ms)
  return cur
end
if cur or renew_only == '1' then
  return false
end
local new = tostring(redis.call('INCR', epoch))
redis.call('SET', lease, new, 'PX', ttl_ms)
return new
