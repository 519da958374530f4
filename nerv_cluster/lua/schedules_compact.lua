-- Compact the schedules stream (nerv_cluster/schedules.py), only while the scheduler holds the lease and
-- only if the stream still ends at last_id (the entry the snapshot's fold covers up to): append the
-- snapshot, then drop every entry before it. A command a client appended meanwhile makes this a no-op
-- (0), so no command is ever trimmed away unfolded.
-- Fixed keys and arguments: see nerv_cluster/scripts.py (SchedulesCompact).
if redis.call('GET', lease) ~= token then
  return redis.error_reply('LEASE_LOST the scheduler lease is held by another token')
end
local last = redis.call('XREVRANGE', schedules, '+', '-', 'COUNT', 1)
if #last == 0 or last[1][1] ~= last_id then
  return 0
end
local id = redis.call('XADD', schedules, '*', 'e', snapshot)
redis.call('XTRIM', schedules, 'MINID', id)
return 1
