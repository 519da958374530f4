"""Tasks the Docker test adds to the stack's cpu workers, as a user would: a module in the image's ``/app``.

The image keeps ``/app`` (on its ``PYTHONPATH``) for your own ``@task`` modules and ``NERV_WORKER_MODULES``
names them; the test bind-mounts this file there. Names are explicit so that the test, which imports
this file as ``tests.docker.nerv_dockertasks``, submits the names the workers registered.
"""

from __future__ import annotations

import socket
import time

from nerv_cluster import task

#: The module name inside the container (``/app/nerv_dockertasks.py``).
MODULE = "nerv_dockertasks"


@task(name=f"{MODULE}.nap", queue="cpu")
def nap(seconds: float, after: object = None) -> str:
    """Sleep ``seconds`` (``after``: an upstream result, only to order tasks); the container's hostname."""
    time.sleep(seconds)
    return socket.gethostname()
