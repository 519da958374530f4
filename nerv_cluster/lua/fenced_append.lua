-- The scheduler's writes: only while it holds the lease (the fencing token must match).
-- First the workers' events it checked and transcribes (README.md#security), before the decisions that
-- follow from them, so a run's log reads cause before effect; an outcome only once (the outcomes hash's
-- field#t marks it transcribed); with them the feed position they cover (position), where a new leader
-- reads the feed from. Their channel gets them now: a worker publishes nothing.
-- Decisions go to the run logs only: the scheduler made them, so it needs no feed copy.
-- Then the hand-offs (see nerv_cluster/handoff.py), in the same atomic step as the TASK_DISPATCHED
-- events they follow: a worker is handed at most one job per wait, as its waiting flag (set by
-- finish.lua with the outcome that says it waits) is consumed here; a worker that stopped waiting
-- deleted it (resign.lua), and then the job is not handed (0) and the scheduler sends it through Celery.
-- A handed attempt is claimed for its worker here, which runs it without claiming it again.
-- Once per call: the reply is kept under the call's own key (reply) for a while, and a second execution
-- of the same call (redis-py resends a command whose reply was lost to a connection error) returns it
-- without writing anything again. Otherwise the retry would append the events twice and, finding the
-- waiting flags consumed by the first execution, report the hand-offs as not made: the job would also
-- go through Celery.
-- Fixed keys and arguments: see nerv_cluster/scripts.py (FencedAppend). The tail: keys run logs and
-- outcomes hashes, then 4 per hand-off: waiting flag, hand-off list, run log, claims hash; arguments
-- n_transcripts quintuples (log's index into KEYS, outcomes hash's index or 0 for a TASK_STARTED,
-- field (task:attempt) or '', channel, event JSON), n_events triples (index into KEYS, channel or ''
-- for none, event JSON), then, with hand-offs: the lists' ttl ms, then 6 per hand-off: field
-- (task:attempt), worker id, channel, TASK_STARTED event JSON, job message (signed), claim (what the
-- waiting flag must hold).
-- Returns 1/0 per hand-off: 1 when handed.
local done = redis.call('GET', reply)
if done then
  local replay = {}
  for i = 1, #done do
    replay[i] = tonumber(string.sub(done, i, i))
  end
  return replay
end
if redis.call('GET', lease) ~= token then
  return redis.error_reply('LEASE_LOST the scheduler lease is held by another token')
end
local nt = tonumber(n_transcripts)
for i = NARGV + 1, NARGV + 5 * nt, 5 do
  local o = tonumber(ARGV[i + 1])
  if o == 0 or redis.call('HSETNX', KEYS[o], ARGV[i + 2] .. '#t', 1) == 1 then
    redis.call('XADD', KEYS[tonumber(ARGV[i])], '*', 'e', ARGV[i + 4])
    redis.call('PUBLISH', ARGV[i + 3], ARGV[i + 4])
  end
end
if position ~= '' then
  redis.call('SET', transcribed, position)
end
local first_event = NARGV + 5 * nt
local n = tonumber(n_events)
for i = first_event + 1, first_event + 3 * n, 3 do
  local key = KEYS[tonumber(ARGV[i])]
  redis.call('XADD', key, '*', 'e', ARGV[i + 2])
  if ARGV[i + 1] ~= '' then
    redis.call('PUBLISH', ARGV[i + 1], ARGV[i + 2])
  end
end
local out = {}
local base = first_event + 1 + 3 * n
if #ARGV >= base then
  local handoffs = (#ARGV - base) / 6
  local first = #KEYS - 4 * handoffs
  for h = 0, handoffs - 1 do
    local k, a = first + 1 + 4 * h, base + 1 + 6 * h
    local flag, list, log, claims = KEYS[k], KEYS[k + 1], KEYS[k + 2], KEYS[k + 3]
    -- Handed only to the wait whose claim the TASK_STARTED names: a flag of a later wait of the same
    -- worker (whose outcome the scheduler has not read yet) is left alone, and the job goes through Celery.
    if redis.call('GET', flag) == ARGV[a + 5] then
      redis.call('DEL', flag)
      redis.call('HSET', claims, ARGV[a], ARGV[a + 1])
      redis.call('XADD', log, '*', 'e', ARGV[a + 3])
      redis.call('PUBLISH', ARGV[a + 2], ARGV[a + 3])
      redis.call('RPUSH', list, ARGV[a + 4])
      redis.call('PEXPIRE', list, ARGV[base])
      out[#out + 1] = 1
    else
      out[#out + 1] = 0
    end
  end
end
redis.call('SET', reply, table.concat(out), 'PX', reply_ttl_ms)
return out
