"""The TLS variants of the deploy files (issue 13, point 4; README.md#security): the Kubernetes overlay
``overlays/tls`` and ``docker-compose.tls.yml``. Redis listens on TLS only, and every nerv process
(scheduler, workers, Flower, the console, the demo) speaks ``rediss://`` verifying the server with the
mounted CA; KEDA too. tests/integration/test_tls.py runs the processes themselves against a TLS Redis."""

from __future__ import annotations

import subprocess
from functools import cache

import pytest
import yaml

from nerv_cluster import Settings
from tests.deploy.test_manifests import (
    K8S,
    K8S_VERSION,
    ROOT,
    Obj,
    by_kind,
    containers,
    kubectl,
    one,
    pod_spec,
)

OVERLAY = K8S / "overlays" / "tls"
COMPOSE_TLS = ROOT / "docker-compose.tls.yml"
CA = "/etc/nerv/tls/ca.crt"


@cache
def _objs() -> tuple[Obj, ...]:
    proc = subprocess.run(
        [kubectl(), "kustomize", str(OVERLAY)], capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == 0, proc.stderr
    return tuple(d for d in yaml.safe_load_all(proc.stdout) if d)


def test_tls_overlay_matches_kubernetes_schemas() -> None:
    kv = pytest.importorskip("kubernetes_validate", reason="schema validation needs kubernetes-validate")
    for obj in _objs():
        if obj["apiVersion"].startswith("keda.sh/"):
            continue
        try:
            kv.validate(obj, K8S_VERSION, strict=True)
        except kv.ValidationError as exc:
            pytest.fail(f"{obj['kind']}/{obj['metadata']['name']} at {list(exc.path)}: {exc.message}")


def _tls_mount(w: Obj) -> str:
    (c,) = containers(w)
    (volume,) = [
        v for v in pod_spec(w)["volumes"] if v.get("secret", {}).get("secretName") == "nerv-redis-tls"
    ]
    (mount,) = [m for m in c["volumeMounts"] if m["name"] == volume["name"]]
    assert mount["readOnly"] is True
    return str(mount["mountPath"])


def test_redis_listens_on_tls_only() -> None:
    objs = list(_objs())
    sts = one(objs, "StatefulSet", "nerv-redis")
    (c,) = containers(sts)
    args = c["args"]
    opt = {a: args[i + 1] for i, a in enumerate(args[:-1]) if a.startswith("--")}
    assert opt["--port"] == "0" and opt["--tls-port"] == "6379"
    where = _tls_mount(sts)
    for flag in ("--tls-cert-file", "--tls-key-file", "--tls-ca-cert-file"):
        assert opt[flag].startswith(where + "/"), flag
    assert "--aclfile" in opt, "TLS and the ACL users together"
    for probe in ("readinessProbe", "livenessProbe"):
        assert "--tls --cacert" in " ".join(c[probe]["exec"]["command"])


def test_every_nerv_pod_speaks_rediss_and_verifies_with_the_ca() -> None:
    objs = list(_objs())
    deployments = by_kind(objs, "Deployment")
    assert set(deployments) == {
        "nerv-scheduler",
        "nerv-worker-cpu",
        "nerv-worker-io",
        "nerv-flower",
        "nerv-console",
    }
    for name, w in deployments.items():
        (c,) = containers(w)
        env = {e["name"]: e.get("value") for e in c["env"]}
        assert env["NERV_REDIS_URL"] == "rediss://nerv-redis:6379/0", name
        assert env["NERV_REDIS_TLS_CA_CERTS"] == CA and CA.startswith(_tls_mount(w) + "/"), name
        settings = Settings.from_env({}, redis_url=env["NERV_REDIS_URL"], redis_tls_ca_certs=CA)
        assert settings.broker.startswith("rediss://"), "the Celery broker is the same TLS Redis"
    for so in by_kind(objs, "ScaledObject").values():
        assert so["spec"]["triggers"][0]["metadata"]["enableTLS"] == "true"
    for auth in by_kind(objs, "TriggerAuthentication").values():
        assert {"parameter": "ca", "name": "nerv-redis-tls", "key": "ca.crt"} in auth["spec"][
            "secretTargetRef"
        ]


def test_compose_tls_variant() -> None:
    spec = yaml.safe_load(COMPOSE_TLS.read_text())["services"]
    base = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    nerv = {n for n, s in base.items() if "build" in s}
    assert nerv <= spec.keys(), f"services without TLS: {nerv - spec.keys()}"
    for name in nerv:
        env = spec[name]["environment"]
        assert env["NERV_REDIS_URL"].startswith("rediss://redis:6379/"), name
        assert env["NERV_REDIS_TLS_CA_CERTS"] == CA, name
        assert any(str(v).endswith(":/etc/nerv/tls:ro") for v in spec[name]["volumes"]), name
    cmd = spec["redis"]["command"]
    opt = {a: cmd[i + 1] for i, a in enumerate(cmd[:-1]) if a.startswith("--")}
    assert opt["--port"] == "0" and opt["--tls-port"] == "6379" and opt["--aclfile"]
    assert "--tls --cacert" in " ".join(spec["redis"]["healthcheck"]["test"])
