"""Redis ACL users per role and namespace: the ``users.acl`` file redis-server loads (``--aclfile``).

The rules live in one reviewed template, ``nerv_cluster/users.acl.template``: per role (scheduler,
worker, client, console, flower, keda) the commands, key patterns (``%R~`` read-only, selectors for
each write) and channels it needs, written for one namespace ``{ns}``; plus ``default`` (disabled) and
``admin`` (operators). :func:`render` writes it out for one or more namespaces with each user's password
as its SHA-256 (``#<hex>``, which Redis ACL files take), so no password is ever in the file, and the
passwords come from the environment: ``NERV_ACL_<ROLE>_PASSWORD`` (one namespace), or
``NERV_ACL_<NAMESPACE>_<ROLE>_PASSWORD`` (several: each team its own), ``NERV_ACL_ADMIN_PASSWORD``.

A role's user is ``<namespace>-<role>`` (``nerv-scheduler``...): a process connects as it with
``NERV_REDIS_USERNAME`` / ``NERV_REDIS_PASSWORD`` or a ``user:password@`` URL (``nerv_cluster.redisauth``).

Invariant: a rendered file grants every user only keys and channels of its own namespace (the admin
aside), and a missing password is an error, never an empty or default one.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence
from importlib import resources

from nerv_cluster.errors import ConfigurationError

#: The roles with a user per namespace, in the template's order.
ROLES = ("scheduler", "worker", "client", "console", "flower", "keda")
#: Users of the whole server (rendered once, whatever the namespaces).
GLOBAL_ROLES = ("admin", "replica", "sentinel")
#: A namespace names keys and ACL patterns: no glob characters, no ``:`` (``team-a`` must not be a
#: prefix of ``team-a:x``'s keys), not empty.
NAMESPACE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
#: Shortest password accepted (a Redis password is checked fast: it must be long, not clever).
MIN_PASSWORD_CHARS = 16

_PASSWORD = re.compile(r"\{password:([a-z]+)\}")
_NS = "{ns}"


def template() -> str:
    """The template's text (packaged with nerv_cluster)."""
    return resources.files("nerv_cluster").joinpath("users.acl.template").read_text()


def user_name(namespace: str, role: str) -> str:
    """The ACL user of ``role`` in ``namespace`` (``admin`` for the operators' user)."""
    return role if role in GLOBAL_ROLES else f"{namespace}-{role}"


def check_namespace(namespace: str) -> str:
    """``namespace`` if it can be one; ConfigurationError saying why not."""
    if not NAMESPACE_RE.fullmatch(namespace):
        raise ConfigurationError(
            f"namespace {namespace!r}: letters, digits, '_', '.', '-' only (starting with a letter or "
            "digit, at most 64): it is the prefix of every key and ACL pattern"
        )
    return namespace


def password_variable(role: str, namespace: str | None = None) -> str:
    """The environment variable holding the password of ``role`` (in ``namespace``, if given)."""
    if namespace is None or role in GLOBAL_ROLES:
        return f"NERV_ACL_{role.upper()}_PASSWORD"
    ns = re.sub(r"[^A-Za-z0-9]", "_", namespace).upper()
    return f"NERV_ACL_{ns}_{role.upper()}_PASSWORD"


def password_hash(password: str) -> str:
    """A password as a Redis ACL file stores it: ``#`` and its SHA-256 in hex."""
    return "#" + hashlib.sha256(password.encode()).hexdigest()


def _password(env: Mapping[str, str], role: str, namespace: str, only: bool) -> str:
    names = [password_variable(role, namespace)]
    if only and role not in GLOBAL_ROLES:
        names.append(password_variable(role))
    for name in names:
        value = env.get(name, "")
        if value:
            if len(value) < MIN_PASSWORD_CHARS:
                raise ConfigurationError(f"{name} is shorter than {MIN_PASSWORD_CHARS} characters")
            return value
    who = user_name(namespace, role)
    raise ConfigurationError(f"no password for the {who} user: set {' or '.join(names)}")


def render(
    namespaces: Sequence[str],
    env: Mapping[str, str],
    roles: Sequence[str] = (*GLOBAL_ROLES, *ROLES),
    text: str | None = None,
) -> str:
    """The ``users.acl`` for ``namespaces`` (each its users of ``roles``; ``admin`` and ``default``
    always), passwords from ``env``.

    Template comments and blank lines are dropped (Redis ACL files have none)."""
    unknown = sorted(set(roles) - set(ROLES) - set(GLOBAL_ROLES))
    if unknown:
        raise ConfigurationError(f"unknown roles {unknown}; known: {', '.join((*GLOBAL_ROLES, *ROLES))}")
    if not namespaces:
        raise ConfigurationError("render the ACL file for at least one namespace")
    for ns in namespaces:
        check_namespace(ns)
    if len(set(namespaces)) != len(namespaces):
        raise ConfigurationError(f"a namespace is named twice in {list(namespaces)}")
    only = len(namespaces) == 1
    lines = [line for line in (text or template()).splitlines() if line.strip() and not line.startswith("#")]
    out: list[str] = []
    for line in lines:
        role = _role_of(line)
        if role and role != "admin" and role not in roles:
            continue
        if _NS not in line:
            out.append(_fill(line, env, role, namespaces[0], only))
            continue
        for ns in namespaces:
            out.append(_fill(line.replace(_NS, ns), env, role, ns, only))
    return "\n".join(out) + "\n"


def _role_of(line: str) -> str:
    found = _PASSWORD.search(line)
    return found.group(1) if found else ""


def _fill(line: str, env: Mapping[str, str], role: str, namespace: str, only: bool) -> str:
    if not role:
        return line
    return _PASSWORD.sub(lambda _m: password_hash(_password(env, role, namespace, only)), line)


def users(text: str) -> dict[str, str]:
    """User name -> its rule line, of a rendered file (for checks and tests)."""
    found: dict[str, str] = {}
    for line in text.splitlines():
        parts = line.split(" ", 2)
        if len(parts) >= 2 and parts[0] == "user":
            found[parts[1]] = line
    return found
