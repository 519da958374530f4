-- The scheduler's cache round trip (see nerv_cluster/caching.py): store entries, then read entries, in
-- one call. Fenced by the lease like every scheduler write: a deposed leader stores nothing.
-- Fixed keys and arguments: see nerv_cluster/scripts.py (CacheExchange). The tail: keys n_store entries to
-- store, then the entries to read; arguments 3 per stored entry: value, time to live in ms, '1' to store
-- only where no entry exists (NX: a result re-stored by a new leader never replaces a newer one).
-- Returns the value of each entry read (nil where there is none). Running it twice (redis-py resends a
-- call whose reply was lost) stores the same values again, which changes nothing that matters.
if redis.call('GET', lease) ~= token then
  return redis.error_reply('LEASE_LOST the scheduler lease is held by another token')
end
local n = tonumber(n_store)
for i = 0, n - 1 do
  local key, a = KEYS[NKEYS + 1 + i], NARGV + 1 + 3 * i
  if ARGV[a + 2] == '1' then
    redis.call('SET', key, ARGV[a], 'PX', ARGV[a + 1], 'NX')
  else
    redis.call('SET', key, ARGV[a], 'PX', ARGV[a + 1])
  end
end
local out = {}
for i = NKEYS + n + 1, #KEYS do
  out[#out + 1] = redis.call('GET', KEYS[i])
end
return out
