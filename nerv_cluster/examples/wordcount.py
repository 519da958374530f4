"""The demo workflow: fetch documents on the io queue, count words on the cpu queue, total them.

Fan-out / fan-in: ``pages`` fetches, one count per page, then a join that adds the counts up.
"""

from __future__ import annotations

import hashlib
import time

from nerv_cluster import Workflow, task

_WORDS = ["nerv", "cluster", "redis", "celery", "event", "log", "fold", "task", "worker", "queue"]


@task(queue="io")
def fetch(url: str, latency: float = 0.01) -> str:
    """Pretend to download ``url``: wait like I/O does, return deterministic text."""
    time.sleep(latency)
    digest = hashlib.sha256(url.encode()).digest()
    return " ".join(_WORDS[b % len(_WORDS)] for b in digest[: 8 + digest[0] % 24])


@task(queue="cpu")
def count_words(text: str) -> int:
    """Count the words of a text."""
    return len(text.split())


@task(queue="cpu")
def total(*counts: int) -> int:
    """Add the counts up."""
    return sum(counts)


def build(pages: int = 200, latency: float = 0.01) -> Workflow:
    """The word-count workflow over ``pages`` pretend URLs."""
    wf = Workflow("word-count")
    texts = [wf.add(fetch, f"https://example.org/page/{i}", latency, id=f"fetch-{i}") for i in range(pages)]
    counts = [wf.add(count_words, t, id=f"count-{i}") for i, t in enumerate(texts)]
    wf.add(total, *counts, id="total", priority="high")
    return wf


def expected_total(pages: int = 200) -> int:
    """What ``total`` must come to for ``build(pages)``, computed locally."""
    return sum(count_words(fetch(f"https://example.org/page/{i}", 0)) for i in range(pages))


#: ``nerv submit nerv_cluster/examples/wordcount.py`` submits this.
workflow = build()
