"""Rendering users.acl (nerv_cluster.acl), the namespace setting and the per-process Redis user
(nerv_cluster.redisauth), without Redis; tests/integration/test_acl.py loads the file into one."""

from __future__ import annotations

import hashlib
import re
import stat
from pathlib import Path

import pytest
from typer.testing import CliRunner

from nerv_cluster import Settings, acl, cli
from nerv_cluster.celery_app import create_celery
from nerv_cluster.constants import Keys
from nerv_cluster.errors import ConfigurationError
from nerv_cluster.redisauth import with_credentials
from nerv_cluster.sentinel import broker


def passwords(*namespaces: str) -> dict[str, str]:
    env = {acl.password_variable(r): f"{r}-password-0123456789" for r in acl.GLOBAL_ROLES}
    for ns in namespaces:
        for role in acl.ROLES:
            env[acl.password_variable(role, ns)] = f"{ns}-{role}-password-0123456789"
    return env


def test_every_role_of_every_namespace_gets_its_user_with_a_hash_never_the_password() -> None:
    env = passwords("team-a", "team-b")
    text = acl.render(["team-a", "team-b"], env)
    users = acl.users(text)
    assert set(users) == {"default", *acl.GLOBAL_ROLES} | {
        f"{ns}-{role}" for ns in ("team-a", "team-b") for role in acl.ROLES
    }
    for value in env.values():
        assert value not in text
    digest = "#" + hashlib.sha256(env["NERV_ACL_TEAM_A_WORKER_PASSWORD"].encode()).hexdigest()
    assert digest in users["team-a-worker"].split()
    assert not any(line.startswith("#") or not line.strip() for line in text.splitlines())
    assert users["default"].split()[2] == "off"


def test_a_namespace_s_users_name_only_its_own_keys_and_channels() -> None:
    text = acl.render(["team-a", "team-b"], passwords("team-a", "team-b"))
    for name, line in acl.users(text).items():
        if name.startswith("team-a-"):
            patterns = re.findall(r"(?:%R~|%W~|~|&)(\S+?)\)?(?=\s|$)", line)
            own = [p for p in patterns if p != "team-a!claim-secret"]  # the scheduler's secret
            assert own and all(p.startswith("team-a:") for p in own), (name, patterns)
            assert "team-b" not in line


def test_one_namespace_takes_the_role_variables_and_a_missing_password_is_an_error() -> None:
    env = {acl.password_variable(r): f"{r}-password-0123456789" for r in (*acl.GLOBAL_ROLES, *acl.ROLES)}
    assert "nerv-scheduler" in acl.users(acl.render(["nerv"], env))
    del env["NERV_ACL_WORKER_PASSWORD"]
    with pytest.raises(ConfigurationError, match="NERV_ACL_NERV_WORKER_PASSWORD or NERV_ACL_WORKER_PASSWORD"):
        acl.render(["nerv"], env)
    # Several namespaces: each its own password, the shared variable is not enough.
    with pytest.raises(ConfigurationError, match="NERV_ACL_TEAM_A_SCHEDULER_PASSWORD"):
        acl.render(["team-a", "team-b"], {**passwords("team-b"), **env})
    short = {**passwords("nerv"), "NERV_ACL_NERV_CLIENT_PASSWORD": "short"}
    with pytest.raises(ConfigurationError, match="shorter than"):
        acl.render(["nerv"], short)


@pytest.mark.parametrize("bad", ["", "a:b", "team*", "x y", "-lead", "a" * 65, "[ab]"])
def test_a_namespace_with_glob_or_separator_characters_is_refused(bad: str) -> None:
    with pytest.raises(ConfigurationError):
        acl.render([bad], passwords(bad) if bad else {})


def test_roles_can_be_chosen() -> None:
    users = acl.users(acl.render(["nerv"], passwords("nerv"), roles=("scheduler", "worker")))
    assert set(users) == {"default", "admin", "nerv-scheduler", "nerv-worker"}


def test_namespace_is_the_prefix_and_nerv_prefix_its_alias() -> None:
    assert Settings.from_env({"NERV_NAMESPACE": "team-a"}).prefix == "team-a"
    assert Settings.from_env({"NERV_PREFIX": "team-b"}).namespace == "team-b"
    assert Settings.from_env({"NERV_NAMESPACE": "t", "NERV_PREFIX": "t"}).prefix == "t"
    with pytest.raises(ConfigurationError, match="disagree"):
        Settings.from_env({"NERV_NAMESPACE": "a", "NERV_PREFIX": "b"})


def test_celery_keys_and_channels_live_in_the_namespace() -> None:
    app = create_celery(Settings.from_env({}, prefix="team-a"))
    options = app.conf.broker_transport_options
    assert options["global_keyprefix"] == "team-a:celery:" == Keys("team-a").celery
    assert Keys("team-a").queue("cpu") == "team-a:celery:cpu"
    assert options["fanout_prefix"] == "/fanout."
    assert app.conf.broker_transport == "nerv_cluster.transport:Transport"
    watcher = create_celery(Settings.from_env({}, broker_restore=False))
    assert watcher.conf.broker_transport == "nerv_cluster.transport:WatcherTransport"


def test_the_process_user_goes_into_urls_that_name_none() -> None:
    s = Settings.from_env({}, redis_username="nerv-worker", redis_password="p@ss/word")
    assert with_credentials("redis://h:6379/0", s) == "redis://nerv-worker:p%40ss%2Fword@h:6379/0"
    assert with_credentials("rediss://h:6379/0", s).startswith("rediss://nerv-worker:")
    assert with_credentials("redis://u:x@h:6379/0", s) == "redis://u:x@h:6379/0", "the URL's own wins"
    assert with_credentials("redis://h/0", Settings()) == "redis://h/0"
    app = create_celery(s.with_(redis_url="redis://h:6379/0"))
    assert app.conf.broker_url.startswith("redis://nerv-worker:")
    url, _, _ = broker(s, "sentinel://s1:26379,s2:26379/nerv/0")
    assert all(u.startswith("sentinel://nerv-worker:p%40ss%2Fword@") for u in url.split(";")), url
    assert "p@ss" not in repr(s), "passwords stay out of the repr"


def test_nerv_acl_render_writes_the_file_or_says_what_is_missing(tmp_path: Path) -> None:
    env = {acl.password_variable(r): f"{r}-password-0123456789" for r in (*acl.GLOBAL_ROLES, *acl.ROLES)}
    out = tmp_path / "users.acl"
    result = CliRunner().invoke(cli.app, ["acl", "render", "-n", "nerv", "-o", str(out)], env=env)
    assert result.exit_code == 0, result.output
    assert "nerv-worker" in acl.users(out.read_text()) and stat.S_IMODE(out.stat().st_mode) == 0o600
    env["NERV_ACL_FLOWER_PASSWORD"] = ""  # empty is missing, whatever the environment holds
    result = CliRunner().invoke(cli.app, ["acl", "render", "-n", "nerv"], env=env)
    assert result.exit_code == 2 and "NERV_ACL_FLOWER_PASSWORD" in result.output
