-- Finished runs: drop each from the active set and let its keys expire after the retention time, unless
-- a rerun reopened it after the end the scheduler is closing (rerun.lua counted the run's reruns past the
-- number the scheduler folded): that run stays open, and the scheduler loads it again when it reads the
-- request. Then the all-runs index forgets runs submitted before the horizon.
-- Fixed keys and arguments: see nerv_cluster/scripts.py (Close). The tail: per run, keys log, outcomes,
-- claims, checkpoint, reruns counter; arguments run id, reruns folded.
-- Returns one 1/0 per run: 1 when closed.
local out = {}
for i = 0, (#ARGV - NARGV) / 2 - 1 do
  local k, a = NKEYS + 1 + 5 * i, NARGV + 1 + 2 * i
  if tonumber(redis.call('GET', KEYS[k + 4]) or '0') <= tonumber(ARGV[a + 1]) then
    redis.call('SREM', active, ARGV[a])
    for j = k, k + 4 do
      redis.call('EXPIRE', KEYS[j], retention)
    end
    out[#out + 1] = 1
  else
    out[#out + 1] = 0
  end
end
redis.call('ZREMRANGEBYSCORE', runs, '-inf', '(' .. horizon)
return out
