-- Acquire or renew the scheduler lease. Keys and arguments: see nerv_cluster/scripts.py (Lease):
-- token is the one we hold ('' when none), renew_only '1' to renew only (never acquire anew).
-- A new token is the epoch counter's next value and a random part the caller made (a script's own
-- randomness is deterministic in Redis): "<epoch>-<nonce>". The counter orders terms; the random part
-- keeps tokens unique when Redis loses its last writes (AOF everysec) and the counter rolls back, so two
-- holders never share a token. Every fenced script compares the token whole.
-- Returns the token held after the call, or false when we do not hold it.
local cur = redis.call('GET', lease)
if cur and cur == token then
  redis.call('PEXPIRE', lease, ttl_ms)
  return cur
end
if cur or renew_only == '1' then
  return false
end
local new = tostring(redis.call('INCR', epoch)) .. '-' .. nonce
redis.call('SET', lease, new, 'PX', ttl_ms)
return new
