-- The scheduler ends attempts it gave up on (lost worker, timeout, cancel) by taking their outcome slot.
-- Whichever comes first wins: the worker's finish.lua or this; the other is dropped. Fenced by the lease.
-- Fixed keys and arguments: see nerv_cluster/scripts.py (Supersede); the tail: the outcomes hashes
-- (keys), then pairs (index into KEYS, field) (arguments).
-- Returns, per pair, the value that holds the slot after the call: value when this call took it (or an
-- earlier call did, e.g. the first execution of a call redis-py resent), else the worker's outcome type.
if redis.call('GET', lease) ~= token then
  return redis.error_reply('LEASE_LOST the scheduler lease is held by another token')
end
local out = {}
for i = NARGV + 1, #ARGV, 2 do
  local outcomes, field = KEYS[tonumber(ARGV[i])], ARGV[i + 1]
  redis.call('HSETNX', outcomes, field, value)
  out[#out + 1] = redis.call('HGET', outcomes, field)
end
return out
