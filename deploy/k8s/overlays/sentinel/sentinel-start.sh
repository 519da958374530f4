#!/bin/sh
# Write this Sentinel's config (it rewrites the file as it learns, so it lives on the pod's emptyDir) and
# start it. It monitors the primary the other Sentinels name, else pod 0 (the first start).
set -eu
me="$(hostname).nerv-redis-sentinel"
primary=""
for i in 0 1 2; do
    host="nerv-redis-sentinel-$i.nerv-redis-sentinel"
    [ "$host" = "$me" ] && continue
    primary=$(redis-cli -h "$host" -p 26379 sentinel get-master-addr-by-name nerv 2>/dev/null | head -n 1) || true
    [ -n "$primary" ] && break
done
[ -z "$primary" ] && primary="nerv-redis-0.nerv-redis"
cat > /data/sentinel.conf <<CONF
port 26379
dir /data
sentinel resolve-hostnames yes
sentinel announce-hostnames yes
sentinel announce-ip $me
requirepass $REDIS_PASSWORD
sentinel sentinel-pass $REDIS_PASSWORD
sentinel monitor nerv $primary 6379 2
sentinel auth-user nerv sentinel
sentinel auth-pass nerv $DATA_NODES_PASSWORD
sentinel down-after-milliseconds nerv 5000
sentinel failover-timeout nerv 60000
sentinel parallel-syncs nerv 1
CONF
exec redis-server /data/sentinel.conf --sentinel
