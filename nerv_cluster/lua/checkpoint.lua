-- Store a run's checkpoint (replacing the previous one), only while the run is open: its log exists and
-- has no expiry yet. The checkpointer runs in a thread beside the scheduler loop, which may close the run
-- (close_runs sets its keys to expire) just before; a checkpoint written after that would never expire.
-- Keys and arguments: see nerv_cluster/scripts.py (Checkpoint).
-- Returns 1 when stored, 0 when the run was closed (or is gone).
if redis.call('PTTL', run_log) ~= -1 then
  return 0
end
redis.call('SET', checkpoint, state)
return 1
