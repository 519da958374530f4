"""A Redis of its own loaded with a rendered ``users.acl`` (``nerv acl render``), for the ACL tests.

The file is rendered from the packaged template (``nerv_cluster.acl``) with throw-away passwords for
each role of each namespace, and redis-server is started with ``--aclfile`` on a free port, no disk.
:meth:`AclRedis.url` gives the URL a role connects with (its user and password in it), and
:meth:`AclRedis.as_role` a redis-py client of that user.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

import redis

from nerv_cluster import acl
from nerv_cluster.embedded import free_port, tail

_CANDIDATES = ("/usr/bin/redis-server", "redis-server")


def redis_server() -> str:
    """A Redis 7 ``redis-server`` (ACL selectors need 7.0)."""
    for name in _CANDIDATES:
        path = shutil.which(name)
        if path:
            return path
    raise AssertionError(f"no redis-server found (tried {list(_CANDIDATES)})")


class AclRedis:
    """redis-server with the rendered ACL file; one password per user, kept here for the tests."""

    def __init__(self, root: Path, namespaces: Sequence[str]) -> None:
        self.root = root
        self.namespaces = list(namespaces)
        self.port = free_port()
        self.passwords: dict[str, str] = {}
        env = {acl.password_variable(role): self._new(role) for role in acl.GLOBAL_ROLES}
        for ns in self.namespaces:
            for role in acl.ROLES:
                env[acl.password_variable(role, ns)] = self._new(acl.user_name(ns, role))
        self.text = acl.render(self.namespaces, env)
        self.aclfile = root / "users.acl"
        self.aclfile.write_text(self.text)
        self._proc: subprocess.Popen[bytes] | None = None

    def _new(self, user: str) -> str:
        self.passwords[user] = secrets.token_urlsafe(24)
        return self.passwords[user]

    def arguments(self, log: Path) -> list[str]:
        """redis-server's command line: a port, no disk, the ACL file."""
        return [
            "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
            "--dir", str(self.root), "--logfile", str(log), "--aclfile", str(self.aclfile),
        ]  # fmt: skip

    def start(self) -> AclRedis:
        """Start the server and wait until the admin can ping it."""
        log = self.root / "redis.log"
        self._proc = subprocess.Popen(
            [redis_server(), *self.arguments(log)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise AssertionError(f"redis-server exited: {tail(log)}")
            try:
                self.admin().ping()
                return self
            except redis.RedisError:
                time.sleep(0.05)
        raise AssertionError(f"redis-server with {self.aclfile} did not start: {tail(log)}")

    def user(self, namespace: str, role: str) -> tuple[str, str]:
        """(user name, password) of ``role`` in ``namespace``."""
        name = acl.user_name(namespace, role)
        return name, self.passwords[name]

    def url(self, namespace: str, role: str, db: int = 0) -> str:
        """The ``redis://user:password@...`` URL of ``role`` in ``namespace``."""
        name, password = self.user(namespace, role)
        return f"redis://{name}:{password}@127.0.0.1:{self.port}/{db}"

    def as_role(self, namespace: str, role: str) -> redis.Redis:
        """A client connected as ``role``'s user (replies decoded)."""
        return redis.Redis.from_url(self.url(namespace, role), decode_responses=True)

    def admin(self) -> redis.Redis:
        """The operators' user."""
        return redis.Redis(
            port=self.port, username="admin", password=self.passwords["admin"], decode_responses=True
        )

    def denials(self) -> list[dict[str, object]]:
        """The server's ACL log (what was refused, to whom), newest first."""
        return list(self.admin().acl_log(count=200))

    def stop(self) -> None:
        """Stop the server (SIGKILL: nothing to keep)."""
        if self._proc is not None and self._proc.poll() is None:
            os.killpg(self._proc.pid, signal.SIGKILL)
            self._proc.wait(timeout=10)
