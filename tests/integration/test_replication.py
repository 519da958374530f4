"""Acknowledged means replicated (issue 17): with ``NERV_REDIS_MIN_REPLICAS`` and no replica to hold a
write, the replicated writes fail loudly instead of being acknowledged. Needs only the test Redis (which
has no replica)."""

from __future__ import annotations

import pytest
import redis

from nerv_cluster import Client, Settings, Workflow
from nerv_cluster.errors import IntakeTimeoutError, ReplicationError
from nerv_cluster.eventlog import EventLog
from nerv_cluster.replication import Replication
from scheduler.lease import Lease
from tests.conftest import TEST_REDIS_URL

pytestmark = pytest.mark.timeout(30)

DB = 7


@pytest.fixture
def url() -> str:
    u = f"{TEST_REDIS_URL}/{DB}"
    redis.Redis.from_url(u).flushdb()
    return u


def test_a_submission_no_replica_holds_is_a_replication_error(url: str) -> None:
    wf = Workflow("needs-a-replica")
    wf.add("nerv_testtasks.add", 1, 2, id="t")
    with Client(
        settings=Settings.from_env({}, redis_url=url, redis_min_replicas=1, redis_replica_timeout_ms=20)
    ) as c:
        with pytest.raises(ReplicationError) as err:
            c.submit(wf, check_names=False)
        assert (err.value.acked, err.value.wanted) == (0, 1)
        assert "not acknowledged" in str(err.value)
    # The request was refused before it was answered: written on the primary (unacknowledged), never
    # applied (no scheduler here: the intake is where a client's write goes, issue 13).
    probe = redis.Redis.from_url(url, decode_responses=True)
    assert probe.xlen(Settings.from_env({}, redis_url=url).keys().intake) == 1
    # Without the setting (the default), the same request is taken into the intake at once, and waits
    # there for a scheduler to answer it.
    with Client(settings=Settings.from_env({}, redis_url=url, intake_timeout=0.5)) as c:
        with pytest.raises(IntakeTimeoutError):
            c.submit(wf, check_names=False)
        assert probe.xlen(c.keys.intake) == 2


def test_a_lease_no_replica_holds_is_not_held(url: str) -> None:
    client = redis.Redis.from_url(url, decode_responses=True)
    log = EventLog(client, Settings.from_env({}, redis_url=url).keys(), Replication(1, 20, tries=2))
    lease = Lease(log, ttl_ms=5_000)
    assert not lease.acquire() and not lease.held  # a scheduler on a lone primary does not lead
    # The write did happen on the primary, unacknowledged; a failover may or may not keep it. With
    # min_replicas 0 (and the lease free again) it would lead.
    client.delete(log.keys.lease)
    assert Lease(EventLog(client, log.keys), ttl_ms=5_000).acquire()
