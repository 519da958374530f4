-- A worker process stops waiting for a hand-off. Atomic against the hand-off in fenced_append.lua:
-- either the waiting flag is still there (nothing was handed: delete it, return nil) or the scheduler
-- consumed it and the job is already on the list (return it: it is claimed for this worker, which
-- must run it). Keys: see nerv_cluster/scripts.py (Resign).
if redis.call('DEL', waiting) == 1 then
  return false
end
return redis.call('LPOP', handoff_list)
