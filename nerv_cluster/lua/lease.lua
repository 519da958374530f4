-- Acquire or renew the scheduler lease.
-- A token is the epoch counter's next value and a random part the caller made (a script's own
-- randomness is deterministic in Redis): "<epoch>-<random>". The counter orders terms; the random part
-- keeps tokens unique when Redis loses its last writes (AOF everysec) and the counter rolls back, so two
-- holders never share a token. Every fenced script compares the token whole.
-- KEYS: 1 lease, 2 epoch counter
-- ARGV: 1 current token ('' when not holding), 2 ttl ms, 3 '1' to renew only (never acquire anew),
--       4 the random part of a new token
-- Returns the token held after the call, or false when we do not hold it.
local cur = redis.call('GET', KEYS[1])
if cur and cur == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return cur
end
if cur or ARGV[3] == '1' then
  return false
end
local token = tostring(redis.call('INCR', KEYS[2])) .. '-' .. ARGV[4]
redis.call('SET', KEYS[1], token, 'PX', ARGV[2])
return token
