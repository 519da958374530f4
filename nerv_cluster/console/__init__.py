"""The web console (``nerv ui``): runs, their DAG drawn live, a timeline, task details, time travel,
actions, and a JSON API with a resumable event stream. See ``docs/console.md``.

``app`` builds the Starlette application and serves it with uvicorn; ``views`` holds the pure
projections of folded state it shows; ``store`` the runs it keeps folded; ``auth`` who may use it.
"""

from __future__ import annotations

from nerv_cluster.console.app import create_app, serve
from nerv_cluster.console.auth import AuthConfig

__all__ = ["AuthConfig", "create_app", "serve"]
