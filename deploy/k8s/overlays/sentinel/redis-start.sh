#!/bin/sh
# Start this Redis pod as the replica of the primary the Sentinels name, or as the primary when no Sentinel
# knows one yet and this is pod 0 (the first start of the set). redis-cli reads the Sentinels' password
# from REDISCLI_AUTH (SENTINEL_PASSWORD here; the container's own REDISCLI_AUTH is the admin's, for the probes).
set -eu
me="$(hostname).nerv-redis"
primary=""
for i in 0 1 2; do
    primary=$(REDISCLI_AUTH="$SENTINEL_PASSWORD" redis-cli -h "nerv-redis-sentinel-$i.nerv-redis-sentinel" -p 26379 \
        sentinel get-master-addr-by-name nerv 2>/dev/null | head -n 1) || true
    [ -n "$primary" ] && break
done
if [ -z "$primary" ]; then
    case "$(hostname)" in
        *-0) primary="$me" ;;
        *) primary="nerv-redis-0.nerv-redis" ;;
    esac
fi
if [ "$primary" = "$me" ]; then
    exec redis-server "$@" --replica-announce-ip "$me"
fi
exec redis-server "$@" --replica-announce-ip "$me" --replicaof "$primary" 6379
