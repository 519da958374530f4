-- Reopen a finished run and append its WORKFLOW_RERUN_REQUESTED, atomically (see nerv_cluster/rerun.py).
-- The client folded the log up to entry `expected` and found the run finished: the request stands only if
-- the log has not moved since (a second rerun racing this one, or a late outcome, moved it: the client
-- folds again) and the run's rerun counter is the one the fold had (rerun number n - 1).
-- Then: the counter becomes n (the scheduler closes a run only for the rerun number it folded, see
-- close.lua), the run's keys lose the expiry Effects.close gave them, the run is active again (a new
-- leader refolds it), and the event goes to the run's log and the feed and is announced.
-- With a token (the scheduler rerunning a run itself, e.g. a child run for its parent task) the call is
-- fenced: only while that token holds the lease. A client passes no token.
-- Fixed keys and arguments: see nerv_cluster/scripts.py (Rerun).
-- Errors: LEASE_LOST (fenced, and the token no longer holds the lease), RUN_GONE (no log: never submitted,
-- or expired), RUN_MOVED (the log or the counter moved).
if token ~= '' and redis.call('GET', lease) ~= token then
  return redis.error_reply('LEASE_LOST the scheduler lease is held by another token')
end
local last = redis.call('XREVRANGE', run_log, '+', '-', 'COUNT', 1)
if #last == 0 then
  return redis.error_reply('RUN_GONE run ' .. run_id .. ' has no log')
end
if last[1][1] ~= expected then
  return redis.error_reply('RUN_MOVED run ' .. run_id .. ' has new events')
end
if tonumber(redis.call('GET', reruns) or '0') + 1 ~= tonumber(n) then
  return redis.error_reply('RUN_MOVED run ' .. run_id .. ' was rerun meanwhile')
end
redis.call('SET', reruns, n)
for _, key in ipairs({run_log, outcomes, claims, checkpoint, reruns}) do
  redis.call('PERSIST', key)
end
redis.call('SADD', active, run_id)
redis.call('XADD', run_log, '*', 'e', event)
redis.call('XADD', feed, 'MAXLEN', '~', feed_maxlen, '*', 'e', event)
redis.call('PUBLISH', channel, event)
return 1
