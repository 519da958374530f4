-- The scheduler ends attempts it gave up on (lost worker, timeout, cancel) by taking their outcome slot.
-- Whichever comes first wins: the worker's finish.lua or this; the other is dropped. Fenced by the lease.
-- Fixed keys and arguments: see nerv_cluster/scripts.py (Supersede); the tail: the outcomes hashes
-- (keys), then pairs (index into KEYS, field) (arguments).
-- Returns one 1/0 per pair: 1 when this call took the slot.
if redis.call('GET', lease) ~= token then
  return redis.error_reply('LEASE_LOST the scheduler lease is held by another token')
end
local out = {}
for i = NARGV + 1, #ARGV, 2 do
  out[#out + 1] = redis.call('HSETNX', KEYS[tonumber(ARGV[i])], ARGV[i + 1], value)
end
return out
