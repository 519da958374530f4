"""The base images that deploy/Dockerfile and docker-compose.yml name: pulled, or built as stand-ins.

A base image already in the engine's store is used as it is. A missing one is pulled when an image
registry answers. Where none does (our machines reach only PyPI, Debian's archive and npm), it is built
locally from Debian bookworm's packages, as a stand-in under the same name:

- ``python:3.11-slim``: ``debootstrap --variant=minbase`` bookworm, imported, plus ``python3`` (3.11)
  and ``python3-venv``, ``python`` on PATH as in the official image;
- ``redis:7-alpine``: the same Debian base plus Debian's ``redis-server`` (7.x), run as ``redis`` in
  ``/data``.

Both carry this host's way to the package registries, so that ``apt-get`` and ``pip`` inside a build
reach them as the host does: the host's CA bundle (split into ``/usr/local/share/ca-certificates``, so
that ``update-ca-certificates`` keeps it), its apt sources and ``Acquire::`` settings (when the host is
itself Debian bookworm), and its pip network settings (index, cert, timeout, proxy) as ``/etc/pip.conf``.

A stand-in is labelled ``org.nerv-cluster.stand-in=<hash>``, the hash of everything it is made of
(recipe, Dockerfile, CA bundle, apt and pip files): a cached stand-in is reused while the hash matches
and rebuilt when any of that changes; an image without the label (a real, pulled one) is never replaced.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from tests.docker.engine import CommandFailed, Engine, run

#: Bump to rebuild every stand-in (a change of recipe that the hashed files do not show).
RECIPE_VERSION = 1
SUITE = "bookworm"
DEBOOTSTRAP_ARGS = ("--variant=minbase", "--include=ca-certificates")
DEFAULT_MIRROR = "http://deb.debian.org/debian"
LABEL = "org.nerv-cluster.stand-in"
#: Pulling a real image may take this long (a registry that answers); a missing one fails at once.
PULL_TIMEOUT_S = 300.0
BUILD_TIMEOUT_S = 900.0
#: pip settings that decide how pip reaches an index (file:// and local paths are the host's alone).
_PIP_NETWORK_KEYS = ("index-url", "extra-index-url", "trusted-host", "proxy", "timeout", "retries", "cert")
_CONTAINER_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"


@dataclass(frozen=True)
class StandIn:
    """How a stand-in for one base image is made: a stage of the generated Dockerfile."""

    name: str  # the image name the Dockerfile / compose file uses
    stage: str
    repo: str  # where the cached stand-in is kept, tagged with its hash
    body: str  # the stage's instructions after ``FROM debian AS <stage>``


STAND_INS = {
    s.name: s
    for s in (
        StandIn(
            "python:3.11-slim",
            "python",
            "nerv-standin/python",
            "RUN apt-get update \\\n"
            " && apt-get install -y --no-install-recommends python3 python3-venv \\\n"
            " && rm -rf /var/lib/apt/lists/* \\\n"
            " && ln -s /usr/bin/python3 /usr/local/bin/python \\\n"
            ' && python --version | grep -q "^Python 3\\.11\\."\n'
            'CMD ["python3"]\n',
        ),
        StandIn(
            "redis:7-alpine",
            "redis",
            "nerv-standin/redis",
            "RUN apt-get update \\\n"
            " && apt-get install -y --no-install-recommends redis-server \\\n"
            " && rm -rf /var/lib/apt/lists/* \\\n"
            " && mkdir -p /data && chown redis:redis /data \\\n"
            ' && redis-server --version | grep -q " v=7\\."\n'
            "WORKDIR /data\n"
            "VOLUME /data\n"
            "USER redis\n"
            "EXPOSE 6379\n"
            'CMD ["redis-server"]\n',
        ),
    )
}


# -- what the host brings -------------------------------------------------------------------------------


def _os_release() -> dict[str, str]:
    try:
        text = Path("/etc/os-release").read_text()
    except OSError:
        return {}
    return {k: v.strip('"') for k, _, v in (line.partition("=") for line in text.splitlines()) if k}


def _host_is_suite() -> bool:
    release = _os_release()
    return release.get("ID") == "debian" and release.get("VERSION_CODENAME") == SUITE


def _apt_sources() -> dict[str, bytes]:
    """The host's enabled apt sources (relative path under /etc/apt -> content), when it is bookworm."""
    if not _host_is_suite():
        return {}
    files: dict[str, bytes] = {}
    main = Path("/etc/apt/sources.list")
    if main.is_file() and re.search(rb"^\s*deb\s", main.read_bytes(), re.M):
        files["sources.list"] = main.read_bytes()
    for path in sorted(Path("/etc/apt/sources.list.d").glob("*")):
        if path.suffix in (".list", ".sources") and path.is_file():
            files[f"sources.list.d/{path.name}"] = path.read_bytes()
    for path in sorted(Path("/etc/apt/apt.conf.d").glob("*")):
        # Proxies, snapshot validity and the like: how apt reaches the archive from here.
        if path.is_file() and b"Acquire::" in path.read_bytes():
            files[f"apt.conf.d/{path.name}"] = path.read_bytes()
    return files


def _mirror(sources: dict[str, bytes]) -> str:
    """The Debian archive debootstrap fetches from: the host's first ``debian`` URI, else the default."""
    for name, content in sources.items():
        if not name.startswith("sources"):
            continue
        for uri in re.findall(rb"(?:^URIs:|^\s*deb(?:\s+\[[^]]*\])?)\s+(\S+)", content, re.M):
            text = uri.decode()
            if text.rstrip("/").endswith("/debian"):
                return text
    return DEFAULT_MIRROR


def _host_bundle() -> Path | None:
    """The CA bundle the host's pip and Python use."""
    import ssl

    for candidate in (
        os.environ.get("PIP_CERT"),
        os.environ.get("SSL_CERT_FILE"),
        os.environ.get("REQUESTS_CA_BUNDLE"),
        ssl.get_default_verify_paths().cafile,
        "/etc/ssl/certs/ca-certificates.crt",
    ):
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    return None


def _ca_files() -> dict[str, bytes]:
    """The host bundle, one certificate a file (``update-ca-certificates`` takes ``*.crt`` files)."""
    bundle = _host_bundle()
    if bundle is None:
        return {}
    pems = re.findall(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", bundle.read_bytes(), re.S)
    return {f"host-{i:04d}.crt": pem + b"\n" for i, pem in enumerate(pems)}


def _pip_conf() -> bytes:
    """``/etc/pip.conf`` for the stand-in: the host's pip network settings, cert at the image's bundle."""
    settings: dict[str, str] = {}
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "config", "list"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    for line in proc.stdout.splitlines():
        m = re.match(r"[\w-]+\.([\w-]+)='(.*)'$", line)
        if m:
            settings[m.group(1)] = m.group(2)
    for key in _PIP_NETWORK_KEYS:  # the environment wins over files, as in pip
        value = os.environ.get("PIP_" + key.upper().replace("-", "_"))
        if value:
            settings[key] = value
    lines = ["[global]"]
    for key in _PIP_NETWORK_KEYS:
        value = settings.get(key)
        if key == "cert":
            lines.append(f"cert = {_CONTAINER_BUNDLE}")
            continue
        if not value:
            continue
        if key in ("index-url", "extra-index-url"):
            urls = [u for u in value.split() if u.startswith(("http://", "https://"))]
            if not urls:
                continue
            value = " ".join(urls)
        lines.append(f"{key} = {value}")
    return ("\n".join(lines) + "\n").encode()


# -- the recipe -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Recipe:
    """Everything the stand-ins are made of, and the hashes that name them."""

    mirror: str
    files: dict[str, bytes]  # build context: path -> content
    copies_sources: bool

    @property
    def rootfs_hash(self) -> str:
        return _digest([str(RECIPE_VERSION), SUITE, *DEBOOTSTRAP_ARGS, self.mirror, str(self.copies_sources)])

    @property
    def rootfs_tag(self) -> str:
        return f"nerv-standin/debian:{SUITE}-{self.rootfs_hash}"

    def dockerfile(self) -> str:
        head = [
            "# Generated by tests/docker/standins.py: stand-ins for the base images no registry serves here.",
            f"FROM {self.rootfs_tag} AS debian",
            "COPY context/ /",
            # The host's apt sources replace debootstrap's single line.
            *(["RUN rm -f /etc/apt/sources.list.debootstrap"] if self.copies_sources else []),
            "RUN update-ca-certificates >/dev/null",
            "ENV LANG=C.UTF-8",
        ]
        text = "\n".join(head) + "\n"
        for s in STAND_INS.values():
            text += f"\nFROM debian AS {s.stage}\n{s.body}LABEL {LABEL}={{hash}} {LABEL}-for={s.name}\n"
        return text

    @property
    def hash(self) -> str:
        parts = [self.rootfs_hash, self.dockerfile()]
        parts += [f"{k}\0{hashlib.sha256(v).hexdigest()}" for k, v in sorted(self.files.items())]
        return _digest(parts)

    def tag(self, s: StandIn) -> str:
        return f"{s.repo}:{self.hash}"


def _digest(parts: Iterable[str]) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]


def recipe() -> Recipe:
    """The stand-in recipe for this host."""
    sources = _apt_sources()
    files = {f"context/etc/apt/{k}": v for k, v in sources.items()}
    files |= {f"context/usr/local/share/ca-certificates/nerv-host/{k}": v for k, v in _ca_files().items()}
    files["context/etc/pip.conf"] = _pip_conf()
    copies = any(k.startswith("sources") for k in sources)
    return Recipe(_mirror(sources), files, copies)


# -- building -------------------------------------------------------------------------------------------


def _rootfs(engine: Engine, r: Recipe, log: Callable[[str], None]) -> None:
    """``debootstrap`` the Debian base and import it, unless it is cached."""
    if engine.image_exists(r.rootfs_tag):
        return
    debootstrap = shutil.which("debootstrap") or "/usr/sbin/debootstrap"
    if not os.access(debootstrap, os.X_OK):
        raise AssertionError(
            "no registry serves the base images and debootstrap is missing (apt-get install debootstrap)"
        )
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="nerv-standin-", dir="/var/tmp") as tmp:
        root = Path(tmp) / "rootfs"
        run([debootstrap, *DEBOOTSTRAP_ARGS, SUITE, str(root), r.mirror], timeout=BUILD_TIMEOUT_S)
        # What an image does not need: downloaded packages and indexes, docs, manuals, locales.
        for sub in (
            "var/cache/apt/archives",
            "var/lib/apt/lists",
            "usr/share/doc",
            "usr/share/man",
            "usr/share/locale",
        ):
            for child in (root / sub).glob("*"):
                if child.is_dir() and not child.is_symlink():
                    shutil.rmtree(child)
                elif child.name != "lock":
                    child.unlink()
        if r.copies_sources and (root / "etc/apt/sources.list").exists():
            # Kept under another name: the Dockerfile drops it once the host's sources are in.
            (root / "etc/apt/sources.list").rename(root / "etc/apt/sources.list.debootstrap")
        tar = subprocess.Popen(["tar", "--numeric-owner", "-C", str(root), "-c", "."], stdout=subprocess.PIPE)
        try:
            imported = subprocess.run(
                [engine.docker, "import", "--change", 'CMD ["bash"]', "-", r.rootfs_tag],
                stdin=tar.stdout,
                capture_output=True,
                text=True,
                timeout=BUILD_TIMEOUT_S,
                check=False,
            )
        finally:
            assert tar.stdout is not None
            tar.stdout.close()
            tar.wait(timeout=60)
        if imported.returncode != 0 or tar.returncode != 0:
            raise CommandFailed(f"docker import of {root} failed: {imported.stderr[-3000:]}")
    log(f"debootstrap {SUITE} -> {r.rootfs_tag} in {time.monotonic() - started:.0f}s")


def _build_stand_in(engine: Engine, r: Recipe, s: StandIn, context: Path, log: Callable[[str], None]) -> None:
    started = time.monotonic()
    engine.build_image(
        context, context / "Dockerfile", r.tag(s), "--target", s.stage, timeout=BUILD_TIMEOUT_S
    )
    log(f"built stand-in {s.name} -> {r.tag(s)} in {time.monotonic() - started:.0f}s")


def _write_context(r: Recipe, into: Path) -> Path:
    for rel, content in r.files.items():
        path = into / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
    (into / "context").mkdir(exist_ok=True)
    (into / "Dockerfile").write_text(r.dockerfile().replace("{hash}", r.hash))
    return into


def _try_pull(engine: Engine, name: str) -> str | None:
    """Pull ``name``; None when it worked, else why not."""
    try:
        proc = engine("pull", "--quiet", name, timeout=PULL_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired:
        return f"no answer in {PULL_TIMEOUT_S:.0f}s"
    return None if proc.returncode == 0 else (proc.stderr.strip().splitlines() or ["?"])[-1]


def ensure(engine: Engine, names: Iterable[str], log: Callable[[str], None] = print) -> dict[str, str]:
    """Make every base image in ``names`` present; for each, how (``local``, ``pulled``, ``stand-in …``).

    Stand-ins are built only for names that are neither in the store nor pullable; those without a
    recipe here fail with the reason the pull failed.
    """
    r = recipe()
    how: dict[str, str] = {}
    wanted: list[StandIn] = []
    for name in dict.fromkeys(names):
        s = STAND_INS.get(name)
        if engine.image_exists(name):
            label = engine.labels(name).get(LABEL)
            if label is None:
                how[name] = "local image"
                continue
            if label == r.hash:
                how[name] = f"stand-in {r.hash} (cached)"
                continue
        why = _try_pull(engine, name)
        if why is None:
            how[name] = "pulled"
            continue
        if s is None:
            raise AssertionError(f"base image {name} cannot be pulled ({why}) and has no stand-in recipe")
        if engine.image_exists(r.tag(s)):
            engine("tag", r.tag(s), name)
            how[name] = f"stand-in {r.hash} (cached as {r.tag(s)})"
            continue
        log(f"{name}: pull failed ({why}); building a stand-in")
        wanted.append(s)
    if wanted:
        _rootfs(engine, r, log)
        with tempfile.TemporaryDirectory(prefix="nerv-standin-ctx-") as tmp:
            context = _write_context(r, Path(tmp))
            # The stages share the Debian stage (built once, cached): build them side by side.
            with ThreadPoolExecutor(len(wanted)) as pool:
                for future in [pool.submit(_build_stand_in, engine, r, s, context, log) for s in wanted]:
                    future.result()
        for s in wanted:
            engine("tag", r.tag(s), s.name)
            how[s.name] = f"stand-in {r.hash} (built)"
        _drop_stale(engine, r)
    return how


def _drop_stale(engine: Engine, r: Recipe) -> None:
    """Untag stand-ins of earlier recipes (only ours: the ``nerv-standin/`` repositories)."""
    current = {r.rootfs_tag, *(r.tag(s) for s in STAND_INS.values())}
    for repo in ["nerv-standin/debian", *(s.repo for s in STAND_INS.values())]:
        tags = engine("images", "--format", "{{.Repository}}:{{.Tag}}", repo).stdout.split()
        for tag in tags:
            if tag not in current:
                engine("rmi", tag, check=False)


def base_images(dockerfile: Path, compose_file: Path) -> list[str]:
    """The images a Dockerfile's ``FROM`` lines (not its own stages) and a compose file's services name."""
    import yaml

    names: list[str] = []
    stages: set[str] = set()
    for line in dockerfile.read_text().splitlines():
        m = re.match(r"\s*FROM\s+(?:--\S+\s+)*(\S+)(?:\s+AS\s+(\S+))?", line, re.I)
        if m:
            if m.group(1) not in stages:
                names.append(m.group(1))
            if m.group(2):
                stages.add(m.group(2))
    services = yaml.safe_load(compose_file.read_text())["services"]
    for spec in services.values():
        image = spec.get("image")
        if image and "build" not in spec:
            names.append(image)
    return list(dict.fromkeys(names))


def main() -> None:
    """``python -m tests.docker.standins``: make the base images present (e.g. ahead of the test)."""
    from tests.docker.engine import open_engine

    root = Path(__file__).resolve().parents[2]
    engine = open_engine(Path(tempfile.mkdtemp(prefix="nerv-dockerd-")))
    try:
        print("\n".join(engine.notes))
        names = base_images(root / "deploy" / "Dockerfile", root / "docker-compose.yml")
        print(json.dumps(ensure(engine, names), indent=2))
    finally:
        engine.close()


if __name__ == "__main__":
    main()
