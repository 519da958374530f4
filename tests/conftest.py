"""Shared test settings: where the test Redis is."""

from __future__ import annotations

import os

#: The Redis server integration tests use (each test cluster takes its own database number on it).
TEST_REDIS_URL = os.environ.get("NERV_TEST_REDIS_URL", "redis://127.0.0.1:6379").rstrip("/")
