-- The scheduler applies one client request (see nerv_cluster/requests.py, scheduler/intake.py): only while
-- it holds the lease, at most once per request id, and answers it in the same atomic step, so an answer
-- never claims a write that did not happen and a write is never left unanswered.
-- Once per request: the answer is kept under done (the request's own key) for done_ttl_ms; a second copy
-- of the request (a client's XADD resent after a lost reply) finds it and gets the same answer again,
-- nothing applied twice. The intake is trimmed up to this entry in the same step (trim_to: the id right
-- after it), so it only ever holds requests not answered yet: a new leader reads it from its start.
-- Ops (op; the tail holds their keys and arguments):
--   trim:   only trim the intake (done and reply are not touched): entries skipped as malformed.
--   none:   nothing to write (a refusal, or an answer of the scheduler's own: cache clear).
--   submit: keys run_log, active, runs; args run_id, channel, event, submitted_at. A new run: registered,
--           its submission logged and announced; other_answer when a run of that id exists.
--   append: keys stream; args channel ('' for none), event, must_exist ('1': other_answer when the stream
--           does not exist), maxlen ('' for none). One event into a run log, the limits or schedules stream.
--   rerun:  keys run_log, outcomes, claims, checkpoint, reruns, active; args run_id, channel, event, expected,
--           n. Reopens a finished run as rerun.lua does (the same rule: the log must still end at expected and
--           the rerun counter be n - 1); other_answer when the log is gone, 'moved' (nothing written,
--           nothing answered: the scheduler folds the log again) when it moved.
-- Out of memory: Redis refuses a script at its first write that may grow memory, unless it wrote already.
-- An op's own first write comes first (a full Redis refuses it whole: nothing written, and the scheduler
-- answers a StoreFullError with op none), and op none trims first, so its small answer always gets through.
-- Fixed keys and arguments: see nerv_cluster/scripts.py (Intake).
-- Returns {status, answer}: status 'applied', 'refused' (other_answer was given), 'again' (answered
-- before), 'moved'.
if redis.call('GET', lease) ~= token then
  return redis.error_reply('LEASE_LOST the scheduler lease is held by another token')
end
if op == 'trim' then  -- only the trim: entries skipped as malformed, with no request after them
  redis.call('XTRIM', intake, 'MINID', trim_to)
  return {'trimmed', ''}
end
local function reply_with(text)
  redis.call('LPUSH', reply, text)
  redis.call('PEXPIRE', reply, reply_ttl_ms)
end
local before = redis.call('GET', done)
if before then
  redis.call('XTRIM', intake, 'MINID', trim_to)
  reply_with(before)
  return {'again', before}
end
local status = 'applied'
local K, A = NKEYS, NARGV
if op == 'none' then
  redis.call('XTRIM', intake, 'MINID', trim_to)
elseif op == 'submit' then
  local run_log, active, runs = KEYS[K + 1], KEYS[K + 2], KEYS[K + 3]
  local run_id, channel, event = ARGV[A + 1], ARGV[A + 2], ARGV[A + 3]
  if redis.call('EXISTS', run_log) == 1 then
    status = 'refused'
  else
    redis.call('SADD', active, run_id)
    redis.call('ZADD', runs, ARGV[A + 4], run_id)
    redis.call('XADD', run_log, '*', 'e', event)
    redis.call('PUBLISH', channel, event)
  end
elseif op == 'append' then
  local stream = KEYS[K + 1]
  local channel, event, must_exist, maxlen = ARGV[A + 1], ARGV[A + 2], ARGV[A + 3], ARGV[A + 4]
  if must_exist == '1' and redis.call('EXISTS', stream) == 0 then
    status = 'refused'
  else
    if maxlen ~= '' then
      redis.call('XADD', stream, 'MAXLEN', '~', maxlen, '*', 'e', event)
    else
      redis.call('XADD', stream, '*', 'e', event)
    end
    if channel ~= '' then
      redis.call('PUBLISH', channel, event)
    end
  end
elseif op == 'rerun' then
  local run_log, outcomes, claims, checkpoint, reruns, active =
    KEYS[K + 1], KEYS[K + 2], KEYS[K + 3], KEYS[K + 4], KEYS[K + 5], KEYS[K + 6]
  local run_id, channel, event, expected, n = ARGV[A + 1], ARGV[A + 2], ARGV[A + 3], ARGV[A + 4], ARGV[A + 5]
  local last = redis.call('XREVRANGE', run_log, '+', '-', 'COUNT', 1)
  if #last == 0 then
    status = 'refused'
  elseif last[1][1] ~= expected or tonumber(redis.call('GET', reruns) or '0') + 1 ~= tonumber(n) then
    return {'moved', ''}
  else
    redis.call('SET', reruns, n)
    for _, key in ipairs({run_log, outcomes, claims, checkpoint, reruns}) do
      redis.call('PERSIST', key)
    end
    redis.call('SADD', active, run_id)
    redis.call('XADD', run_log, '*', 'e', event)
    redis.call('PUBLISH', channel, event)
  end
else
  return redis.error_reply('BAD_OP unknown intake op ' .. tostring(op))
end
local text = answer
if status == 'refused' then
  text = other_answer
end
redis.call('SET', done, text, 'PX', done_ttl_ms)
reply_with(text)
if op ~= 'none' then
  redis.call('XTRIM', intake, 'MINID', trim_to)
end
return {status, text}
