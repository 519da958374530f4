-- The scheduler ends attempts it gave up on (lost worker, timeout, cancel) by taking their outcome slot.
-- Whichever comes first wins: the worker's finish.lua or this; the other is dropped. Fenced by the lease.
-- KEYS: 1 lease, 2.. outcomes hashes
-- ARGV: 1 token, 2 value to store, then pairs (index into KEYS, field)
-- Returns, per pair, the value that holds the slot after the call: ARGV[2] when this call took it (or an
-- earlier call did, e.g. the first execution of a call redis-py resent), else the worker's outcome type.
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return redis.error_reply('LEASE_LOST the scheduler lease is held by another token')
end
local out = {}
for i = 3, #ARGV, 2 do
  local outcomes, field = KEYS[tonumber(ARGV[i])], ARGV[i + 1]
  redis.call('HSETNX', outcomes, field, ARGV[2])
  out[#out + 1] = redis.call('HGET', outcomes, field)
end
return out
