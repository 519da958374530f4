"""Fixtures of the unit tests: pure, no Redis, no processes."""

from __future__ import annotations

import pytest

from nerv_cluster import registry as registry_module
from nerv_cluster import workflow as workflow_module
from nerv_cluster.registry import Registry


@pytest.fixture
def reg() -> Registry:
    """A fresh registry, so tests never touch the global one."""
    return Registry()


@pytest.fixture
def default_reg(monkeypatch: pytest.MonkeyPatch) -> Registry:
    """Replace the global default registry by a fresh one for this test (``@task`` and ``Workflow``)."""
    fresh = Registry()
    monkeypatch.setattr(registry_module, "default_registry", fresh)
    monkeypatch.setattr(workflow_module, "default_registry", fresh)
    return fresh
