-- Create child runs (nerv_cluster/children.py), only while the scheduler holds the lease: per spawn, the
-- child's submission (registered in the active set and the runs index like any run, its first event in
-- its log) and CHILD_STARTED in the parent's log, in one atomic step. At most once per parent attempt:
-- the parent's outcomes hash records the creation (field task:attempt#child), so a resent call, or a
-- new leader repeating a decision it found unrecorded, creates nothing twice.
-- Fixed keys and arguments: see nerv_cluster/scripts.py (Spawn). The tail: keys per spawn child log,
-- parent log, parent outcomes hash; arguments per spawn field, child run id, submitted_at, child
-- channel, WORKFLOW_SUBMITTED JSON, parent channel, CHILD_STARTED JSON.
-- Returns per spawn 'created', 'done' (created by an earlier call: its events are logged) or 'taken'
-- (another run already has the child's id: nothing written).
if redis.call('GET', lease) ~= token then
  return redis.error_reply('LEASE_LOST the scheduler lease is held by another token')
end
local out = {}
for i = 0, (#ARGV - NARGV) / 7 - 1 do
  local child_log, parent_log, outcomes = KEYS[NKEYS + 1 + 3 * i], KEYS[NKEYS + 2 + 3 * i], KEYS[NKEYS + 3 + 3 * i]
  local a = NARGV + 1 + 7 * i
  local field, child, submitted_at = ARGV[a], ARGV[a + 1], ARGV[a + 2]
  local child_chan, submitted, parent_chan, started = ARGV[a + 3], ARGV[a + 4], ARGV[a + 5], ARGV[a + 6]
  if redis.call('HGET', outcomes, field) == child then
    out[#out + 1] = 'done'
  elseif redis.call('EXISTS', child_log) == 1 then
    out[#out + 1] = 'taken'
  else
    redis.call('HSET', outcomes, field, child)
    redis.call('SADD', active, child)
    redis.call('ZADD', runs, submitted_at, child)
    redis.call('XADD', child_log, '*', 'e', submitted)
    redis.call('PUBLISH', child_chan, submitted)
    redis.call('XADD', parent_log, '*', 'e', started)
    redis.call('PUBLISH', parent_chan, started)
    out[#out + 1] = 'created'
  end
end
return out
