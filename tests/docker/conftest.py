"""Fixtures of the Docker tests: the engine (started here when none runs), the image of deploy/Dockerfile."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from tests.docker import standins
from tests.docker.engine import Engine, Unavailable, open_engine
from tests.integration.cluster import ROOT

DOCKERFILE = ROOT / "deploy" / "Dockerfile"
COMPOSE_FILE = ROOT / "docker-compose.yml"
#: The tag the test builds and the compose stack runs (``NERV_IMAGE_TAG``): kept, so the next build is cached.
IMAGE_TAG = "docker-test"
IMAGE = f"nerv-cluster:{IMAGE_TAG}"


class Steps:
    """Named, timed steps of a Docker test, printed as they end (``-rA`` shows them for a passing test)."""

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.times: list[tuple[str, float]] = []
        self._last = self.started

    def done(self, what: str) -> None:
        now = time.monotonic()
        self.times.append((what, now - self._last))
        print(f"[docker] {what}: {now - self._last:.1f}s (total {now - self.started:.1f}s)", flush=True)
        self._last = now


@dataclass
class Image:
    """The image built from deploy/Dockerfile, and how its base images were had."""

    ref: str
    bases: dict[str, str]
    steps: Steps = field(default_factory=Steps)


@pytest.fixture(scope="session")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    """A Docker engine, BuildKit and Compose v2; skips (saying why) where the engine cannot start."""
    try:
        eng = open_engine(tmp_path_factory.mktemp("dockerd"))
    except Unavailable as exc:
        if exc.skip:
            pytest.skip(f"no Docker engine here: {exc}")
        pytest.fail(f"Docker engine: {exc}")
    for note in eng.notes:
        print(f"[docker] {note}")
    try:
        yield eng
    finally:
        eng.close()


@pytest.fixture(scope="session")
def image(engine: Engine) -> Image:
    """deploy/Dockerfile built (with the repository as context) over pulled or stand-in base images."""
    steps = Steps()
    bases = standins.ensure(engine, standins.base_images(DOCKERFILE, COMPOSE_FILE), log=print)
    for name, how in bases.items():
        print(f"[docker] base image {name}: {how}")
    steps.done("base images")
    previous = engine("image", "inspect", "--format", "{{.Id}}", IMAGE, check=False).stdout.strip()
    engine.build_image(ROOT, DOCKERFILE, IMAGE)
    if previous and previous != engine("image", "inspect", "--format", "{{.Id}}", IMAGE).stdout.strip():
        # The previous build, untagged now: not left to pile up (the build cache keeps its layers).
        engine("rmi", previous, check=False)
    steps.done(f"docker build -f deploy/Dockerfile -t {IMAGE} .")
    return Image(IMAGE, bases, steps)
