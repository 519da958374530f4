-- A worker claims attempts before running them, and records TASK_STARTED for each it may run.
-- First it records the outcomes of the attempts it ran before (as finish.lua does, each once): a packed
-- batch claims each job when it starts, and the same round trip carries the outcomes of the jobs
-- before it, so a job costs one round trip and a batch never holds claims on jobs it has not started.
-- A worker writes no run log (design.md §12, README.md#security): its events go to the feed only, with its
-- attempt's claim token in a field of their own ('t'); the scheduler checks them and transcribes them into
-- the run's log in its fenced write. No MAXLEN here: the feed is trimmed by the scheduler, only below what
-- it transcribed.
-- Per attempt the verdict is 'done' when it already has an outcome (a redelivery, or superseded: do not
-- run it), 'busy' when another live worker process holds it, 'poison' when processes holding it died
-- too often (claimed all the same: the caller records the failure), 'ok' when this worker may run it.
-- With batch = '1' the attempts are a packed batch claimed together before any of them runs (cheap: one
-- round trip for the batch); each claim is marked (field#b), since a process lost then may have died in
-- any job of the batch: taking such an attempt over counts no loss. An attempt whose holder died is not
-- claimed in a batch ('strict'): the caller claims it alone, right before it runs, so that a loss then
-- is its own and counted.
-- Fixed keys and arguments: see nerv_cluster/scripts.py (Start). The tail: keys per outcome its outcomes
-- hash, then per attempt outcomes hash, claims hash; arguments per outcome field (task:attempt), outcome
-- (event type), event JSON, token, then per attempt field, TASK_STARTED event JSON, token.
local n = tonumber(n_outcomes)
for i = 0, n - 1 do
  local outcomes = KEYS[NKEYS + 1 + i]
  local a = NARGV + 1 + 4 * i
  local field, outcome, event, tok = ARGV[a], ARGV[a + 1], ARGV[a + 2], ARGV[a + 3]
  if redis.call('HSETNX', outcomes, field, outcome) == 1 then
    redis.call('XADD', feed, '*', 'e', event, 't', tok)
  end
end
local kbase, abase = NKEYS + n, NARGV + 4 * n
local verdicts = {}
for i = 0, (#ARGV - abase) / 3 - 1 do
  local outcomes, claims = KEYS[kbase + 1 + 2 * i], KEYS[kbase + 2 + 2 * i]
  local a = abase + 1 + 3 * i
  local field, event, tok = ARGV[a], ARGV[a + 1], ARGV[a + 2]
  local verdict = 'ok'
  if redis.call('HEXISTS', outcomes, field) == 1 then
    verdict = 'done'
  else
    local holder = redis.call('HGET', claims, field)
    if holder and holder ~= worker then
      if redis.call('EXISTS', heartbeat_prefix .. holder) == 1 then
        verdict = 'busy'
      elseif batch == '1' then
        verdict = 'strict'
      elseif redis.call('HEXISTS', claims, field .. '#b') == 1 then
        -- The dead holder had claimed it with its batch, maybe never started it: no loss counted.
        verdict = 'ok'
      elseif redis.call('HINCRBY', claims, field .. '#lost', 1) >= tonumber(max_takeovers) then
        -- The holders died without an outcome too often.
        verdict = 'poison'
      end
    end
  end
  -- A poison attempt is claimed too (a takeover, as its holder died): only its claim's holder can
  -- record the failure the caller records for it (nerv_cluster/outcomes.py).
  if verdict == 'ok' or verdict == 'poison' then
    redis.call('HSET', claims, field, worker)
    if batch == '1' then
      redis.call('HSET', claims, field .. '#b', 1)
    else
      redis.call('HDEL', claims, field .. '#b')
    end
    redis.call('XADD', feed, '*', 'e', event, 't', tok)
  end
  verdicts[#verdicts + 1] = verdict
end
return verdicts
