"""Settings from ``NERV_*`` variables, and the Redis key names."""

from __future__ import annotations

import fnmatch
import re

import pytest

from nerv_cluster import constants
from nerv_cluster.constants import Keys
from nerv_cluster.errors import ConfigurationError
from nerv_cluster.settings import Settings


def test_defaults_from_an_empty_environment():
    s = Settings.from_env({})
    assert s == Settings()
    assert s.redis_url == constants.DEFAULT_REDIS_URL
    assert s.prefix == constants.DEFAULT_PREFIX
    assert s.max_payload_bytes == constants.DEFAULT_MAX_PAYLOAD_BYTES
    assert s.broker == s.redis_url


def test_parses_ints_bools_tuples_and_strings():
    s = Settings.from_env(
        {
            "NERV_REDIS_URL": "redis://cache:6380/2",
            "NERV_PREFIX": "tenant1",
            "NERV_MAX_TASKS": "10",
            "NERV_LEASE_TTL_MS": " 7000 ",
            "NERV_TASK_EVENTS": "no",
            "NERV_WORKER_MODULES": "app.tasks, other.tasks,, third ",
            "NERV_LOG_LEVEL": "DEBUG",
            "UNRELATED": "x",
        }
    )
    assert s.redis_url == "redis://cache:6380/2"
    assert s.prefix == "tenant1"
    assert s.max_tasks == 10 and isinstance(s.max_tasks, int)
    assert s.lease_ttl_ms == 7000
    assert s.task_events is False
    assert s.worker_modules == ("app.tasks", "other.tasks", "third")
    assert s.log_level == "DEBUG"
    assert s.keys().prefix == "tenant1"


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("1", True),
        ("true", True),
        ("YES", True),
        ("On", True),
        ("0", False),
        ("false", False),
        ("off", False),
    ],
)
def test_bool_values(raw, expected):
    assert Settings.from_env({"NERV_TASK_EVENTS": raw}).task_events is expected


def test_float_fields():
    s = Settings.from_env({"NERV_CPU_TIMEOUT": "2.5", "NERV_IO_TIMEOUT": "3"})
    assert s.cpu_timeout == 2.5 and s.io_timeout == 3.0


def test_empty_values_are_ignored():
    assert Settings.from_env({"NERV_MAX_TASKS": "", "NERV_PREFIX": ""}) == Settings()


@pytest.mark.parametrize(
    ("name", "raw"),
    [("NERV_MAX_TASKS", "many"), ("NERV_BATCH_SIZE", "1.5"), ("NERV_BLOCK_MS", "10ms")],
)
def test_bad_int_is_a_configuration_error(name, raw):
    with pytest.raises(ConfigurationError) as info:
        Settings.from_env({name: raw})
    assert name in str(info.value) and raw in str(info.value)


def test_bad_float_is_a_configuration_error():
    with pytest.raises(ConfigurationError, match="NERV_CPU_TIMEOUT"):
        Settings.from_env({"NERV_CPU_TIMEOUT": "soon"})


@pytest.mark.parametrize("url", ["http://localhost:6379", "localhost:6379", "", "redis:/x"])
def test_bad_url_is_a_configuration_error(url):
    with pytest.raises(ConfigurationError, match="redis_url"):
        Settings(redis_url=url)


def test_bad_url_from_the_environment():
    with pytest.raises(ConfigurationError, match="redis_url"):
        Settings.from_env({"NERV_REDIS_URL": "mysql://db"})


@pytest.mark.parametrize("url", ["redis://h:1/0", "rediss://h:1/0", "unix:///tmp/redis.sock"])
def test_good_urls(url):
    assert Settings(redis_url=url).redis_url == url


@pytest.mark.parametrize(
    "field", ["max_payload_bytes", "max_result_bytes", "lease_ttl_ms", "batch_size", "max_tasks"]
)
def test_limits_must_be_positive(field):
    with pytest.raises(ConfigurationError, match=field):
        Settings(**{field: 0})
    with pytest.raises(ConfigurationError, match=field):
        Settings.from_env({f"NERV_{field.upper()}": "-1"})


def test_overrides_win_over_the_environment():
    s = Settings.from_env({"NERV_MAX_TASKS": "10", "NERV_PREFIX": "env"}, max_tasks=20)
    assert s.max_tasks == 20 and s.prefix == "env"


def test_from_env_reads_os_environ(monkeypatch):
    monkeypatch.setenv("NERV_BATCH_SIZE", "77")
    monkeypatch.setenv("NERV_BROKER_URL", "redis://broker:6379/1")
    s = Settings.from_env()
    assert s.batch_size == 77
    assert s.broker == "redis://broker:6379/1"


def test_from_dsn(monkeypatch):
    monkeypatch.setenv("NERV_REDIS_URL", "redis://from-env:6379/0")
    monkeypatch.setenv("NERV_PREFIX", "p")
    s = Settings.from_dsn("redis://given:6379/3")
    assert s.redis_url == "redis://given:6379/3" and s.prefix == "p"


def test_with_makes_a_validated_copy():
    s = Settings()
    t = s.with_(batch_size=5)
    assert t.batch_size == 5 and s.batch_size == constants.DEFAULT_BATCH_SIZE
    with pytest.raises(ConfigurationError):
        s.with_(redis_url="nope")


# -- keys -------------------------------------------------------------------------------------------


def hash_tag(key: str) -> str:
    """The part of a key Redis Cluster hashes: the first non-empty ``{...}``, else the whole key."""
    m = re.search(r"\{([^}]+)\}", key)
    return m.group(1) if m else key


@pytest.mark.parametrize("run_id", ["wf-0123456789ab", "my_run", "x"])
def test_run_keys_share_the_run_hash_tag(run_id):
    k = Keys("nerv")
    per_run = [k.log(run_id), k.outcomes(run_id), k.claims(run_id), k.channel(run_id)]
    assert len(set(per_run)) == 4
    for key in per_run:
        assert key.startswith("nerv:{" + run_id + "}:")
        assert hash_tag(key) == run_id
    assert k.run_keys(run_id) == (
        k.log(run_id),
        k.outcomes(run_id),
        k.claims(run_id),
        k.checkpoint(run_id),
        k.reruns(run_id),
    )


def test_different_runs_get_different_tags():
    k = Keys()
    assert hash_tag(k.log("a")) != hash_tag(k.log("b"))


def test_channel_pattern_matches_every_run_channel_only():
    k = Keys("nerv")
    assert fnmatch.fnmatchcase(k.channel("run-1"), k.channel_pattern)
    assert fnmatch.fnmatchcase(k.channel("other"), k.channel_pattern)
    assert not fnmatch.fnmatchcase(k.log("run-1"), k.channel_pattern)
    assert not fnmatch.fnmatchcase(Keys("else").channel("run-1"), k.channel_pattern)


def test_global_keys_use_the_prefix():
    k = Keys("t9")
    for key in (k.feed, k.active, k.runs, k.lease, k.epoch, k.registry, k.workers):
        assert key.startswith("t9:")
        assert "{" not in key
    assert len({k.feed, k.active, k.runs, k.lease, k.epoch, k.registry, k.workers}) == 7
    assert k.heartbeat("w1") == k.heartbeat_prefix + "w1"
    assert Keys().prefix == constants.DEFAULT_PREFIX
