"""Worker hosts for integration tests: Linux network namespaces linked to this machine by veth pairs.

Each host ``i`` is a namespace ``nervtest-<pid>-<i>`` with one veth pair: the root side has
``10.213.<s>.<4i+1>/30``, the namespace side ``10.213.<s>.<4i+2>/30``. A namespace has no other interface
and no default route, so its processes reach this machine's root-side address and nothing else. Workers
run in a namespace with their own UTS namespace too, so each host has its own hostname.

Everything created here is removed by :meth:`Hosts.close` (processes in the namespaces are killed first).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

from nerv_cluster.launcher import Service
from tests.integration.cluster import Cluster

#: The private range the test hosts live in (one /24 per test process, /30 per host).
NET_PREFIX = "10.213"

#: Starts a worker in a fresh UTS namespace named after ``NERV_TEST_HOSTNAME`` (python 3.11 has no
#: ``os.unshare``: call the libc function; 0x04000000 is CLONE_NEWUTS).
_LAUNCH = (
    "import ctypes, os, socket\n"
    "libc = ctypes.CDLL(None, use_errno=True)\n"
    "if libc.unshare(0x04000000) != 0:\n"
    "    raise OSError(ctypes.get_errno(), 'unshare(CLONE_NEWUTS) refused')\n"
    "socket.sethostname(os.environ['NERV_TEST_HOSTNAME'])\n"
    "from nerv_cluster.cli import main\n"
    "main()\n"
)


class HostsUnavailable(Exception):
    """Network namespaces or veth links cannot be created here (the reason says why)."""


@dataclass(frozen=True)
class Host:
    """One worker host: a namespace, its link and addresses."""

    index: int
    netns: str
    hostname: str
    veth_root: str
    veth_host: str
    root_addr: str
    host_addr: str


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=20)
    if check and proc.returncode != 0:
        raise subprocess.CalledProcessError(proc.returncode, proc.args, proc.stdout, proc.stderr)
    return proc


def _subnet_in_use(third: int) -> bool:
    """True if any address or route of this machine already lies in 10.213.<third>.0/24."""
    prefix = f"{NET_PREFIX}.{third}."
    text = _ip("-4", "addr", "show").stdout + _ip("-4", "route", "show", "table", "all").stdout
    return prefix in text


class Hosts:
    """``n`` namespaces, each linked to the root namespace; use as a context manager."""

    def __init__(self, n: int = 3) -> None:
        self.n = n
        self.tag = str(os.getpid())
        self.hosts: list[Host] = []
        self._netns: list[str] = []
        self._veths: list[str] = []

    # -- set up ---------------------------------------------------------------------------------------

    def create(self) -> Hosts:
        """Create the namespaces and links. Raises :class:`HostsUnavailable` where that is refused."""
        if shutil.which("ip") is None:
            raise HostsUnavailable("the `ip` command (Debian package iproute2) is not installed")
        try:
            third = self._pick_subnet()
            for i in range(self.n):
                self.hosts.append(self._add_host(i, third))
        except subprocess.CalledProcessError as exc:
            self.close()
            why = (exc.stderr or exc.stdout or "").strip()
            raise HostsUnavailable(f"`{' '.join(exc.cmd)}` failed ({exc.returncode}): {why}") from None
        except BaseException:
            self.close()
            raise
        return self

    def _pick_subnet(self) -> int:
        start = os.getpid() % 200
        for k in range(200):
            third = 20 + (start + k) % 200
            if not _subnet_in_use(third):
                return third
        raise HostsUnavailable(f"no free /24 in {NET_PREFIX}.20-219.0")

    def _add_host(self, i: int, third: int) -> Host:
        host = Host(
            index=i,
            netns=f"nervtest-{self.tag}-{i}",
            hostname=f"nerv-host-{i}",
            veth_root=f"nv{self.tag}r{i}",  # interface names: at most 15 characters
            veth_host=f"nv{self.tag}h{i}",
            root_addr=f"{NET_PREFIX}.{third}.{4 * i + 1}",
            host_addr=f"{NET_PREFIX}.{third}.{4 * i + 2}",
        )
        _ip("netns", "add", host.netns)
        self._netns.append(host.netns)
        _ip("link", "add", host.veth_root, "type", "veth", "peer", "name", host.veth_host)
        self._veths.append(host.veth_root)
        _ip("link", "set", host.veth_host, "netns", host.netns)
        _ip("addr", "add", f"{host.root_addr}/30", "dev", host.veth_root)
        _ip("link", "set", host.veth_root, "up")
        _ip("-n", host.netns, "addr", "add", f"{host.host_addr}/30", "dev", host.veth_host)
        _ip("-n", host.netns, "link", "set", host.veth_host, "up")
        _ip("-n", host.netns, "link", "set", "lo", "up")
        return host

    # -- use ------------------------------------------------------------------------------------------

    def worker(self, c: Cluster, host: Host, redis_url: str, concurrency: int = 2) -> Service:
        """Start a cpu worker on ``host`` (its own process group, registered with ``c`` for stopping)."""
        return c.spawn(
            f"worker-{host.hostname}",
            *("worker", "--queues", "cpu", "--concurrency", str(concurrency)),
            wrapper=("ip", "netns", "exec", host.netns),
            command=(sys.executable, "-c", _LAUNCH),
            env={"NERV_REDIS_URL": redis_url, "NERV_TEST_HOSTNAME": host.hostname},
        )

    def pids(self, host: Host) -> set[int]:
        """The processes running in the host's namespace."""
        out = _ip("netns", "pids", host.netns, check=False).stdout
        return {int(p) for p in out.split()}

    def cut(self, host: Host) -> None:
        """Take the host's link down (from this machine's side): it can no longer reach anything."""
        _ip("link", "set", host.veth_root, "down")

    # -- tear down ------------------------------------------------------------------------------------

    def close(self) -> None:
        """Kill what runs in the namespaces, delete the links and the namespaces (never raises)."""
        for ns in self._netns:
            out = _ip("netns", "pids", ns, check=False).stdout
            for pid in out.split():
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and any(
            _ip("netns", "pids", ns, check=False).stdout.strip() for ns in self._netns
        ):
            time.sleep(0.05)
        for veth in self._veths:
            _ip("link", "del", veth, check=False)  # deletes its peer too
        for ns in self._netns:
            _ip("netns", "del", ns, check=False)
        self._veths.clear()
        self._netns.clear()

    def __enter__(self) -> Hosts:
        return self.create()

    def __exit__(self, *exc: object) -> None:
        self.close()


def why_hosts_unavailable() -> str | None:
    """Why test hosts cannot be made here (creating one and removing it again), or None when they can."""
    probe = Hosts(1)
    try:
        probe.create()
    except HostsUnavailable as exc:
        return str(exc)
    probe.close()
    return None
