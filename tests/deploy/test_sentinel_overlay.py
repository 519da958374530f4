"""The Kubernetes overlay for Redis high availability (deploy/k8s/overlays/sentinel, issue 17): prod plus
three Redis pods under three Sentinels, every nerv pod on ``sentinel://`` with ``NERV_REDIS_MIN_REPLICAS``."""

from __future__ import annotations

import subprocess
from functools import cache

import pytest
import yaml

from nerv_cluster import Settings
from nerv_cluster.sentinel import SentinelURL
from tests.deploy.test_manifests import K8S, K8S_VERSION, Obj, by_kind, containers, kubectl, one

OVERLAY = K8S / "overlays" / "sentinel"


@cache
def _objs() -> tuple[Obj, ...]:
    proc = subprocess.run(
        [kubectl(), "kustomize", str(OVERLAY)], capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == 0, proc.stderr
    return tuple(d for d in yaml.safe_load_all(proc.stdout) if d)


def objs() -> list[Obj]:
    return list(_objs())


def test_objects_match_kubernetes_schemas() -> None:
    kv = pytest.importorskip("kubernetes_validate", reason="schema validation needs kubernetes-validate")
    for obj in objs():
        if obj["apiVersion"].startswith("keda.sh/"):
            continue
        try:
            kv.validate(obj, K8S_VERSION, strict=True)
        except kv.ValidationError as exc:
            pytest.fail(f"{obj['kind']}/{obj['metadata']['name']} at {list(exc.path)}: {exc.message}")


def test_everything_is_in_the_prod_namespace_and_part_of_the_cluster() -> None:
    for o in objs():
        if o["kind"] != "Namespace":
            assert o["metadata"]["namespace"] == "nerv", o["metadata"]["name"]
        assert o["metadata"]["labels"]["app.kubernetes.io/part-of"] == "nerv-cluster"


def test_every_nerv_pod_asks_the_sentinels() -> None:
    sentinels = one(objs(), "StatefulSet", "nerv-redis-sentinel")
    service = sentinels["spec"]["serviceName"]
    config = one(objs(), "ConfigMap", "nerv-config")["data"]
    assert config["NERV_REDIS_MIN_REPLICAS"] == "1"
    deployments = by_kind(objs(), "Deployment")
    assert set(deployments) == {
        "nerv-scheduler",
        "nerv-worker-cpu",
        "nerv-worker-io",
        "nerv-flower",
        "nerv-console",
    }
    for name, w in deployments.items():
        c = containers(w)[0]
        env = {e["name"]: e for e in c["env"]}
        # Its role's ACL user on the data nodes; the Sentinels' own password beside it.
        assert env["NERV_REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == "nerv-redis-users", name
        assert env["NERV_REDIS_USERNAME"]["value"].startswith("nerv-"), name
        sentinel_pw = env["NERV_REDIS_SENTINEL_PASSWORD"]["valueFrom"]["secretKeyRef"]
        assert sentinel_pw == {"name": "nerv-redis", "key": "password"}, name
        url = SentinelURL.parse(env["NERV_REDIS_URL"]["value"])
        replicas = sentinels["spec"]["replicas"]
        assert url.sentinels == tuple((f"nerv-redis-sentinel-{i}.{service}", 26379) for i in range(replicas))
        assert url.service == "nerv" and url.db == 0
        Settings.from_env({}, redis_url=env["NERV_REDIS_URL"]["value"])  # valid for nerv too


def test_redis_has_three_pods_that_refuse_writes_cut_off_from_their_replicas() -> None:
    redis_set = by_kind(objs(), "StatefulSet")["nerv-redis"]
    assert redis_set["spec"]["replicas"] == 3
    (c,) = containers(redis_set)
    args = c["args"]
    assert args[args.index("--min-replicas-to-write") + 1] == "1"
    assert args[args.index("--maxmemory-policy") + 1] == "noeviction"
    # A demoted primary must authenticate to the new one: as the `replica` ACL user.
    assert args[args.index("--masteruser") + 1] == "replica"
    assert args[args.index("--masterauth") + 1] == "$(REPLICA_PASSWORD)"
    env = {e["name"]: e for e in c["env"]}
    assert env["REPLICA_PASSWORD"]["valueFrom"]["secretKeyRef"] == {
        "name": "nerv-redis-users",
        "key": "replica",
    }
    assert args[args.index("--maxmemory") + 1]  # prod's cap is kept
    assert c["command"] == ["sh", "/ha/redis-start.sh"]


def test_the_start_scripts_are_valid_shell_and_name_the_same_service() -> None:
    data = one(objs(), "ConfigMap", "nerv-redis-ha")["data"]
    for name in ("redis-start.sh", "sentinel-start.sh"):
        proc = subprocess.run(["sh", "-n"], input=data[name], text=True, capture_output=True, check=False)
        assert proc.returncode == 0, f"{name}: {proc.stderr}"
        assert "get-master-addr-by-name nerv" in data[name]
    assert "sentinel monitor nerv $primary 6379 2" in data["sentinel-start.sh"]
    assert (OVERLAY / "redis-start.sh").read_text() == data["redis-start.sh"]


def test_disruption_budgets_keep_a_quorum() -> None:
    pdbs = by_kind(objs(), "PodDisruptionBudget")
    assert pdbs["nerv-redis"]["spec"]["maxUnavailable"] == 1
    assert pdbs["nerv-redis-sentinel"]["spec"]["maxUnavailable"] == 1


# --- docker-compose: the `sentinel` profile and docker-compose.sentinel.yml ---------------------------------


def test_compose_sentinel_profile_and_override() -> None:
    from tests.deploy.test_manifests import ROOT, services

    svcs = services()
    sentinels = sorted(n for n in svcs if n.startswith("sentinel-"))
    replicas = sorted(n for n in svcs if n.startswith("redis-replica-"))
    assert len(sentinels) == 3 and len(replicas) == 2
    for name in sentinels + replicas:
        assert svcs[name]["profiles"] == ["sentinel"], name
    for name in replicas:
        cmd = svcs[name]["command"]
        assert cmd[cmd.index("--replicaof") + 1 : cmd.index("--replicaof") + 3] == ["redis", "6379"]
    script = svcs["sentinel-1"]["command"][0]
    assert "sentinel monitor nerv redis 6379 2" in script and "--sentinel" in script
    override = yaml.safe_load((ROOT / "docker-compose.sentinel.yml").read_text())["services"]
    nerv = {n for n, s in svcs.items() if "build" in s or str(s.get("image", "")).startswith("nerv-cluster")}
    assert set(override) == nerv, "every nerv service goes through the Sentinels"
    for name, svc in override.items():
        url = SentinelURL.parse(svc["environment"]["NERV_REDIS_URL"])
        assert sorted(h for h, _ in url.sentinels) == sentinels and url.service == "nerv", name
        assert set(svc["depends_on"]) == set(sentinels + replicas)
