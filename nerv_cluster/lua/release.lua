-- Give the lease up, only if we hold it. Keys and arguments: see nerv_cluster/scripts.py (Release).
if redis.call('GET', lease) == token then
  return redis.call('DEL', lease)
end
return 0
