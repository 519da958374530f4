-- Store a run's checkpoint (replacing the previous one), only while the run is open: its log exists and
-- has no expiry yet. The checkpointer runs in a thread beside the scheduler loop, which may close the run
-- (close_runs sets its keys to expire) just before; a checkpoint written after that would never expire.
-- KEYS: 1 run log, 2 checkpoint
-- ARGV: 1 checkpoint JSON
-- Returns 1 when stored, 0 when the run was closed (or is gone).
if redis.call('PTTL', KEYS[1]) ~= -1 then
  return 0
end
redis.call('SET', KEYS[2], ARGV[1])
return 1
