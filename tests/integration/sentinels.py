"""A Redis primary, two replicas and three Sentinels on local ports, for the failover drills.

Two replicas, not one: with ``NERV_REDIS_MIN_REPLICAS=1`` a write is acknowledged once one replica holds
it, so after the primary is lost the new primary still needs one replica to accept work.

Every server is its own ``redis-server`` (Sentinels with ``--sentinel``), in its own process group, in
a temporary directory; :meth:`HaRedis.close` kills them all. Sentinel timeouts are short
(``down-after-milliseconds`` 1000) so a failover takes a few seconds.

Ports: ``NERV_TEST_HA_PORTS`` (primary, two replicas, three Sentinels, comma-separated), by default
6395, 6396, 6397, 26391, 26392, 26393.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path

import redis

from nerv_cluster.embedded import EmbeddedRedis, redis_server_binary, tail

SERVICE = "nervha"
DOWN_AFTER_MS = 1000
FAILOVER_TIMEOUT_MS = 3000


def _ports() -> list[int]:
    raw = os.environ.get("NERV_TEST_HA_PORTS", "6395,6396,6397,26391,26392,26393")
    ports = [int(p) for p in raw.split(",")]
    assert len(ports) == 6, f"NERV_TEST_HA_PORTS needs 6 ports, got {raw!r}"
    return ports


class HaRedis:
    """The servers; ``url`` is the ``sentinel://`` URL the cluster uses."""

    def __init__(self, root: Path) -> None:
        self.root = root
        primary, *replicas = _ports()[:3]
        sentinels = _ports()[3:]
        # No disk, no delay before a full sync: a replica (or a demoted primary) catches up at once.
        common = ["--repl-diskless-sync", "yes", "--repl-diskless-sync-delay", "0"]
        self.nodes = [EmbeddedRedis(primary, dir=root / "primary", extra_args=common)] + [
            EmbeddedRedis(
                port,
                dir=root / f"replica-{port}",
                extra_args=[*common, "--replicaof", "127.0.0.1", str(primary)],
            )
            for port in replicas
        ]
        self.sentinel_ports = sentinels
        self._sentinels: list[subprocess.Popen[bytes]] = []
        hosts = ",".join(f"127.0.0.1:{p}" for p in sentinels)
        self.url = f"sentinel://{hosts}/{SERVICE}/0"

    # -- life cycle -----------------------------------------------------------------------------------

    def start(self) -> HaRedis:
        """Start the primary, the replicas (and wait until they are in sync), then the Sentinels (and
        wait until each knows the replicas and the other two)."""
        for node in self.nodes:
            node.start()
        self._wait(
            lambda: all(self.info(i).get("master_link_status") == "up" for i in (1, 2)),
            10,
            "replicas never synced",
        )
        binary = redis_server_binary()
        primary = self.nodes[0].port
        for port in self.sentinel_ports:
            d = self.root / f"sentinel-{port}"
            d.mkdir(parents=True, exist_ok=True)
            conf = d / "sentinel.conf"
            conf.write_text(
                f"port {port}\nbind 127.0.0.1\ndir {d}\nlogfile {d / 'sentinel.log'}\n"
                f"sentinel monitor {SERVICE} 127.0.0.1 {primary} 2\n"
                f"sentinel down-after-milliseconds {SERVICE} {DOWN_AFTER_MS}\n"
                f"sentinel failover-timeout {SERVICE} {FAILOVER_TIMEOUT_MS}\n"
                f"sentinel parallel-syncs {SERVICE} 1\n"
            )
            self._sentinels.append(
                subprocess.Popen(
                    [binary, str(conf), "--sentinel"],
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                    start_new_session=True,
                )
            )

        def settled() -> bool:
            try:
                for port in self.sentinel_ports:
                    s = self.sentinel(port)
                    info = s.sentinel_master(SERVICE)
                    if int(info["num-slaves"]) < 2 or int(info["num-other-sentinels"]) < 2:
                        return False
                return True
            except redis.RedisError:
                return False

        self._wait(settled, 20, "the Sentinels never saw each other and the replica")
        return self

    def close(self) -> None:
        """Kill every server (a stopped one is continued first, so it can die)."""
        for proc in self._sentinels:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        for node in self.nodes:
            if node.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(node.pid, signal.SIGCONT)
            node.kill()

    # -- facts and faults -----------------------------------------------------------------------------

    def sentinel(self, port: int | None = None) -> redis.Redis:
        """A client of one Sentinel."""
        return redis.Redis(
            port=port or self.sentinel_ports[0],
            decode_responses=True,
            socket_timeout=2,
            socket_connect_timeout=2,
        )

    def node(self, i: int) -> redis.Redis:
        """A direct client of node ``i`` (0: the first primary, 1 and 2: the first replicas)."""
        return redis.Redis(port=self.nodes[i].port, decode_responses=True, socket_timeout=2)

    def info(self, i: int) -> dict[str, str]:
        """``INFO replication`` of node ``i``."""
        return {k: str(v) for k, v in self.node(i).info("replication").items()}

    def master_port(self) -> int | None:
        """The primary's port as a majority of the Sentinels name it now."""
        seen: dict[int, int] = {}
        for port in self.sentinel_ports:
            try:
                addr = self.sentinel(port).sentinel_get_master_addr_by_name(SERVICE)
            except redis.RedisError:
                continue
            if addr:
                seen[int(addr[1])] = seen.get(int(addr[1]), 0) + 1
        best = max(seen.items(), key=lambda kv: kv[1], default=None)
        return best[0] if best and best[1] >= 2 else None

    def signal(self, i: int, sig: int) -> None:
        """Send ``sig`` to node ``i`` (SIGKILL: it is gone for good)."""
        node = self.nodes[i]
        if sig == signal.SIGKILL:
            node.kill()
            return
        assert node.pid is not None
        os.killpg(node.pid, sig)

    def wait_failover(self, timeout: float = 20) -> int:
        """Wait until the Sentinels name a replica as primary, it acts as one and the other replica
        follows it; the new primary's node index."""
        ports = [n.port for n in self.nodes]

        def done() -> bool:
            port = self.master_port()
            if port not in ports[1:]:
                return False
            new = ports.index(port)
            other = 3 - new
            return self.info(new).get("role") == "master" and self.info(other).get("master_port") == str(port)

        self._wait(done, timeout, "no failover to a replica")
        return ports.index(self.master_port())

    def logs(self) -> str:
        """The Sentinels' log tails, for a failure message."""
        return "\n".join(tail(self.root / f"sentinel-{p}" / "sentinel.log", 15) for p in self.sentinel_ports)

    def _wait(self, ok: object, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if ok():  # type: ignore[operator]
                    return
            except redis.RedisError:
                pass
            time.sleep(0.05)
        raise AssertionError(f"{what} within {timeout}s\n{self.logs()}")
