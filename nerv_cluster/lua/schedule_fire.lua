-- Fire schedule slots (nerv_cluster/schedules.py), only while the scheduler holds the lease: per fire,
-- the run's submission (registered in the active set and the runs index like any run, its first event
-- in its log) unless a run of that id exists, and SCHEDULE_FIRED in the schedules stream, in one atomic
-- step; then the notes (SCHEDULE_SKIPPED) to the schedules stream. The run id derives from the
-- (schedule, slot), so a resent call, a new leader repeating a fire it did not see recorded, or a
-- second leader creates no run twice.
-- Fixed keys and arguments: see nerv_cluster/scripts.py (ScheduleFire). The tail: keys per fire its run
-- log; arguments per fire run id, submitted_at, channel, WORKFLOW_SUBMITTED JSON, SCHEDULE_FIRED JSON,
-- then one JSON per note.
-- Returns per fire 1 (created) or 0 (the run existed: nothing written for it but the record).
if redis.call('GET', lease) ~= token then
  return redis.error_reply('LEASE_LOST the scheduler lease is held by another token')
end
local out = {}
local n = tonumber(n_fires)
for i = 0, n - 1 do
  local run_log = KEYS[NKEYS + 1 + i]
  local a = NARGV + 1 + 5 * i
  local run_id, submitted_at, chan, submitted, fired = ARGV[a], ARGV[a + 1], ARGV[a + 2], ARGV[a + 3], ARGV[a + 4]
  if redis.call('EXISTS', run_log) == 1 then
    out[#out + 1] = 0
  else
    redis.call('SADD', active, run_id)
    redis.call('ZADD', runs, submitted_at, run_id)
    redis.call('XADD', run_log, '*', 'e', submitted)
    redis.call('PUBLISH', chan, submitted)
    out[#out + 1] = 1
  end
  redis.call('XADD', schedules, '*', 'e', fired)
end
for i = NARGV + 5 * n + 1, #ARGV do
  redis.call('XADD', schedules, '*', 'e', ARGV[i])
end
return out
