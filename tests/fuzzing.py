"""Hypothesis strategies for every wire form nerv-cluster reads from Redis (issue 13, point 7).

One strategy per wire form, each as three kinds of input: arbitrary JSON (or bytes), valid forms, and
valid forms mutated (a field of the wrong type, a field missing, a huge or odd id, a value out of
range). The unit fuzzers (``tests/unit/test_fuzz_*.py``) feed them to the code that decodes the form;
the garbage drill (``tests/integration/test_garbage_drill.py``) draws from the same generators
(:func:`near_valid`, :func:`random_json`, :func:`garbage_bytes`, :func:`seal`) with a seeded
``random.Random``, outside Hypothesis, to push them into a live cluster.

Wire forms here: workflow definitions (``WORKFLOW_SUBMITTED``'s ``workflow``), events (the log's and the
feed's entries), signed job messages (``<signature><JSON>`` in a Celery message's body or on a hand-off
list: valid ones signed with :data:`SIGNING_KEY`, forged ones, signed bodies that are no job),
intake requests (an intake entry's fields ``i``, ``q``, ``w``) and checkpoints. A new form adds a
strategy here and a line to :data:`WIRE_FORMS`; see ``README.md#security``.

Profiles: ``HYPOTHESIS_PROFILE=ci`` (the default: derandomized, few examples, quick) or ``deep``
(randomized, many examples); ``NERV_FUZZ_EXAMPLES=N`` sets the example count of either.
"""

from __future__ import annotations

import base64
import json
import os
import random
import string
import uuid
from collections.abc import Callable
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from nerv_cluster import constants
from nerv_cluster.model import EventType
from nerv_cluster.signing import SIGNATURE_CHARS, Signer

# --------------------------------------------------------------------------------------------------
# profiles

_EXAMPLES = os.environ.get("NERV_FUZZ_EXAMPLES")
settings.register_profile(
    "ci",
    derandomize=True,
    deadline=None,
    max_examples=int(_EXAMPLES or 150),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
    print_blob=True,
)
settings.register_profile(
    "deep",
    derandomize=False,
    deadline=None,
    max_examples=int(_EXAMPLES or 5_000),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
    print_blob=True,
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def examples(n: int) -> settings:
    """Settings for one test: ``n`` examples in the ci profile, scaled up in the deep one (or
    ``NERV_FUZZ_EXAMPLES`` exactly, when set)."""
    if _EXAMPLES:
        return settings(max_examples=int(_EXAMPLES))
    if os.environ.get("HYPOTHESIS_PROFILE") == "deep":
        return settings(max_examples=n * 30)
    return settings(max_examples=n)


# --------------------------------------------------------------------------------------------------
# JSON

FN = "tests.noop"
ID_CHARS = string.ascii_letters + string.digits + "_-."

#: Scalars that break code expecting another type: wrong types, out of range, odd floats, odd text.
ODD_SCALARS: list[Any] = [
    None,
    True,
    False,
    0,
    -1,
    1,
    2**63,
    -(2**70),
    0.5,
    -0.0,
    1e308,
    float("inf"),
    float("-inf"),
    float("nan"),
    "",
    " ",
    "x" * 300,
    "é",
    "\x00",
    "a:b",
    "{run}",
    "../..",
    "[0]",
    "1",
    "true",
    [],
    {},
    [None],
    {"": None},
    {constants.REF_KEY: "t0"},
    {constants.REF_KEY: 5},
]

json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**66), max_value=2**66),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
    st.sampled_from(ODD_SCALARS[:-6]),
)


def json_values(max_leaves: int = 12) -> st.SearchStrategy[Any]:
    """Arbitrary JSON (NaN and infinities included: Python's json reads and writes them)."""
    return st.recursive(
        json_scalars,
        lambda inner: st.one_of(
            st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)
        ),
        max_leaves=max_leaves,
    )


def odd_values() -> st.SearchStrategy[Any]:
    """A value to put where another was: a listed odd scalar or a little arbitrary JSON."""
    return st.one_of(st.sampled_from(ODD_SCALARS), json_values(4))


# --------------------------------------------------------------------------------------------------
# mutation: any JSON value, changed in one place


def _paths(value: Any, prefix: tuple[Any, ...] = (), depth: int = 0) -> list[tuple[Any, ...]]:
    """Every path into a JSON value (dict keys, list indexes), the root included, at most 6 deep."""
    out = [prefix]
    if depth >= 6:
        return out
    if isinstance(value, dict):
        for k, v in value.items():
            out.extend(_paths(v, (*prefix, k), depth + 1))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            out.extend(_paths(v, (*prefix, i), depth + 1))
    return out


def _copy(value: Any) -> Any:
    return json.loads(json.dumps(value))


def _parent(root: Any, path: tuple[Any, ...]) -> Any:
    for p in path[:-1]:
        root = root[p]
    return root


def mutate_with(rng: random.Random, value: Any, odd: Callable[[], Any]) -> Any:
    """``value`` (JSON) changed in one place chosen by ``rng``: a value replaced by ``odd()``, a key
    or element dropped, a key added, a value duplicated elsewhere, or a string made huge."""
    out = _copy(value)
    paths = _paths(out)
    path = paths[rng.randrange(len(paths))]
    how = rng.randrange(6)
    if not path:
        return odd() if how < 3 else out
    parent, key = _parent(out, path), path[-1]
    if how == 0 or how == 5:
        parent[key] = odd()
    elif how == 1:
        del parent[key]
    elif how == 2 and isinstance(parent, dict):
        parent[rng.choice(["id", "fn", "deps", "r", "k", "a", "t", "d", "x", "", "i"])] = odd()
    elif how == 3:
        other = paths[rng.randrange(len(paths))]
        target = out
        for p in other:
            target = target[p]
        if other[: len(path)] != path:  # never nest a value into itself
            parent[key] = _copy(target)
    else:
        cur = parent[key]
        parent[key] = (cur * 2000)[:20_000] if isinstance(cur, str) and cur else "y" * 5_000
    return out


@st.composite
def mutated(draw: st.DrawFn, base: st.SearchStrategy[Any], max_changes: int = 3) -> Any:
    """A value of ``base`` changed in 1 to ``max_changes`` places."""
    value = draw(base)
    rng = random.Random(draw(st.integers(0, 2**32)))
    odds = [draw(odd_values()) for _ in range(4)]
    for _ in range(draw(st.integers(1, max_changes))):
        value = mutate_with(rng, value, lambda: _copy(rng.choice(odds)) if _json_safe(odds) else None)
    return value


def _json_safe(values: list[Any]) -> bool:
    try:
        json.dumps(values)
    except (TypeError, ValueError):
        return False
    return True


# --------------------------------------------------------------------------------------------------
# workflow definitions (WORKFLOW_SUBMITTED's "workflow")

ids = st.builds(
    lambda a, b: a + b, st.sampled_from(string.ascii_letters + string.digits), st.text(ID_CHARS, max_size=8)
)
#: Small argument values (the recursive JSON strategy is slow to draw per task).
small_json = st.one_of(json_scalars, st.lists(json_scalars, max_size=2))


@st.composite
def definitions(draw: st.DrawFn, max_tasks: int = 6) -> dict[str, Any]:
    """A valid definition (JSON form): a DAG of up to ``max_tasks`` tasks with most task options."""
    n = draw(st.integers(1, max_tasks))
    tids = draw(st.lists(ids, min_size=n, max_size=n, unique=True))
    tasks: list[dict[str, Any]] = []
    signals: dict[str, str] = {}
    for i, tid in enumerate(tids):
        earlier = tids[:i]
        deps = draw(st.lists(st.sampled_from(earlier), max_size=3, unique=True)) if earlier else []
        t: dict[str, Any] = {"id": tid, "fn": FN}
        kind = draw(st.sampled_from(["task"] * 6 + ["map", "wait"]))
        if kind == "wait":
            t["fn"] = constants.WAIT_FN
            spec = draw(
                st.sampled_from([{"signal": f"s{i}"}, {"signal": f"s{i}", "timeout": 5}, {"sleep": 0.1}])
            )
            t["wait"] = spec
            if "signal" in spec:
                signals[spec["signal"]] = tid
        if deps:
            t["deps"] = deps
        if kind == "map":
            t["over"] = {constants.REF_KEY: deps[0]} if deps else draw(st.lists(st.integers(), max_size=4))
        if kind != "wait":
            refs = [{constants.REF_KEY: d} for d in deps]
            t["args"] = refs + draw(st.lists(small_json, max_size=2))
            if draw(st.booleans()):
                t["kwargs"] = draw(
                    st.dictionaries(
                        st.text(string.ascii_lowercase, min_size=1, max_size=4), small_json, max_size=2
                    )
                )
            options: dict[str, st.SearchStrategy[Any]] = {
                "priority": st.sampled_from(["LOW", "MEDIUM", "HIGH", "CRITICAL", "high", 0, 3]),
                "timeout": st.floats(0.1, 100),
                "retry": st.builds(
                    lambda n, b: {"max_retries": n, "backoff": b}, st.integers(0, 3), st.floats(0, 1)
                ),
                "queue": st.sampled_from(constants.QUEUES),
                "tags": st.lists(st.text(max_size=5), max_size=2),
                "trigger": st.sampled_from(["all_success", "all_done", "one_failed", "none_failed"]),
                "context": st.booleans(),
                "circuit": st.just({"failures": 3, "cooldown": 1.0}),
                "cache": st.builds(lambda ttl: {"ttl": ttl, "version": "1"}, st.floats(1, 100)),
                "concurrency": st.builds(lambda k, n: {"key": k, "limit": n}, ids, st.integers(1, 4)),
                "rate_limit": st.builds(
                    lambda k, n: {"name": k, "rate": n, "per": 1.0}, ids, st.integers(1, 9)
                ),
            }
            for key in draw(st.lists(st.sampled_from(sorted(options)), max_size=3, unique=True)):
                if kind == "map" and key in ("cache",):
                    continue
                t[key] = draw(options[key])
        tasks.append(t)
    out: dict[str, Any] = {"name": draw(st.text(max_size=10)), "tasks": tasks}
    if signals:
        out["meta"] = {"signals": signals}
    return out


@st.composite
def broken_graphs(draw: st.DrawFn) -> dict[str, Any]:
    """A definition whose graph is wrong: a cycle, a self-loop, an unknown or duplicate id, a huge
    or odd id, an unknown queue, a map over a task it does not depend on, a bad wait."""
    d = draw(definitions(max_tasks=5))
    tasks = d["tasks"]
    how = draw(st.integers(0, 9))
    if how == 0 and len(tasks) > 1:  # a cycle: the first task depends on the last
        tasks[0].setdefault("deps", []).append(tasks[-1]["id"])
        tasks[-1].setdefault("deps", []).append(tasks[0]["id"])
    elif how == 1:
        tasks[-1].setdefault("deps", []).append(tasks[-1]["id"])
    elif how == 2:
        tasks[-1].setdefault("deps", []).append("no-such-task")
    elif how == 3:
        tasks.append(dict(tasks[0]))
    elif how == 4:
        tasks[-1]["id"] = draw(st.sampled_from(["x" * 5_000, "", "é", "a b", "a:b", "{x}", "-a", "a\n"]))
    elif how == 5:
        tasks[-1]["queue"] = draw(st.sampled_from(["gpu", "", "CPU", 1, None, ["cpu"]]))
    elif how == 6:
        tasks[-1]["over"] = {constants.REF_KEY: "elsewhere"}
    elif how == 7:
        tasks[-1]["fn"] = constants.WAIT_FN
        tasks[-1]["wait"] = draw(odd_values())
    elif how == 8:
        tasks[-1]["deps"] = draw(odd_values())
    else:
        d["meta"] = draw(st.sampled_from([{"signals": {"s": "nowhere"}}, {"signals": 3}, {"depth": "deep"}]))
    return d


def definition_inputs() -> st.SearchStrategy[Any]:
    """Everything a ``workflow`` field may hold: arbitrary JSON, valid, broken and mutated definitions."""
    return st.one_of(json_values(), definitions(), broken_graphs(), mutated(definitions()))


# --------------------------------------------------------------------------------------------------
# events (entries of a run's log and of the feed)

EVENT_TYPES = [t.value for t in EventType]


def _error_form() -> st.SearchStrategy[dict[str, Any]]:
    return st.builds(
        lambda m: {"type": "ValueError", "message": m, "traceback": "", "types": ["ValueError", "Exception"]},
        st.text(max_size=10),
    )


def event_data(kind: str, task_ids: list[str]) -> st.SearchStrategy[dict[str, Any]]:
    """Data of the shape the writers of ``kind`` give it (roughly: values drawn near the real ones)."""
    w = st.sampled_from(["w1", "w2"])
    num = st.floats(0, 1e6)
    shapes: dict[str, st.SearchStrategy[dict[str, Any]]] = {
        "TASK_DISPATCHED": st.fixed_dictionaries({}, optional={"queue": st.just("cpu"), "slot": ids}),
        "TASK_STARTED": st.fixed_dictionaries({"worker": w}, optional={"via": ids, "batch": st.booleans()}),
        "TASK_COMPLETED": st.fixed_dictionaries(
            {"result": json_values(4), "worker": w}, optional={"started_at": num, "handoff": w}
        ),
        "TASK_FAILED": st.fixed_dictionaries(
            {"error": _error_form(), "worker": w}, optional={"reason": st.text(max_size=5)}
        ),
        "TASK_RETRYING": st.fixed_dictionaries(
            {"error": _error_form()}, optional={"delay": st.floats(0, 5), "next_attempt": st.integers(1, 4)}
        ),
        "TASK_PENDING": st.fixed_dictionaries({}, optional={"counted": st.booleans(), "reason": st.text()}),
        "TASK_SPAWNED": st.fixed_dictionaries({"workflow": definitions(max_tasks=2), "worker": w}),
        "CHILD_STARTED": st.fixed_dictionaries({"child": ids}),
        "SIGNAL_RECEIVED": st.fixed_dictionaries({"name": ids, "payload": json_values(3)}),
        "MAP_EXPANDED": st.fixed_dictionaries({"width": st.integers(0, 5)}),
        "CACHE_HITS": st.fixed_dictionaries(
            {
                "hits": st.lists(
                    st.tuples(st.sampled_from(task_ids), st.integers(1, 2), json_values(2), ids).map(list),
                    max_size=3,
                )
            }
        ),
        "WORKFLOW_RERUN_REQUESTED": st.fixed_dictionaries(
            {"n": st.integers(1, 2)}, optional={"tasks": st.lists(st.sampled_from(task_ids), max_size=2)}
        ),
        "TASK_HELD": st.fixed_dictionaries({"reason": st.text(max_size=5)}),
    }
    return shapes.get(kind, st.fixed_dictionaries({}, optional={"reason": st.text(max_size=5)}))


@st.composite
def events(draw: st.DrawFn, run_id: str, task_ids: list[str]) -> dict[str, Any]:
    """A well-formed event (JSON form) of run ``run_id`` about one of ``task_ids`` (or a made-up one),
    of any type, with data near its writers' shape: valid on the wire, often stale or out of place."""
    kind = draw(st.sampled_from([t for t in EVENT_TYPES if t != "WORKFLOW_SUBMITTED"]))
    out: dict[str, Any] = {
        "i": draw(st.text(string.hexdigits, min_size=1, max_size=8)),
        "t": kind,
        "r": run_id,
        "ts": draw(st.floats(0, 2e9)),
        "s": draw(st.sampled_from(["", "client", "worker:w1", "scheduler:x"])),
    }
    if draw(st.integers(0, 9)):
        out["k"] = draw(st.sampled_from([*task_ids, "ghost", "t0[0]"]))
        out["a"] = draw(st.integers(0, 3))
    data = draw(event_data(kind, task_ids))
    if data:
        out["d"] = data
    return out


def event_inputs(run_id: str, task_ids: list[str]) -> st.SearchStrategy[Any]:
    """A feed entry's ``e`` field: bytes, text, JSON of any shape, well-formed and mutated events."""
    shaped = events(run_id, task_ids)
    return st.one_of(
        st.binary(max_size=40),
        st.text(max_size=40),
        json_values().map(json.dumps),
        shaped.map(json.dumps),
        mutated(shaped).map(json.dumps),
    )


# --------------------------------------------------------------------------------------------------
# jobs: a Celery message body, a hand-off list entry


@st.composite
def jobs(draw: st.DrawFn, run_id: str = "run-1", task_ids: tuple[str, ...] = ("t0", "t1")) -> dict[str, Any]:
    """A valid job body (``Job.to_dict``'s form)."""
    out: dict[str, Any] = {"r": run_id, "k": draw(st.sampled_from(task_ids)), "a": draw(st.integers(1, 3))}
    out["fn"] = FN
    optional = {
        "args": st.lists(json_values(2), max_size=3),
        "kwargs": st.dictionaries(
            st.text(string.ascii_lowercase, min_size=1, max_size=4), json_values(2), max_size=2
        ),
        "w": st.text(max_size=6),
        "ctx": st.dictionaries(st.sampled_from(task_ids), json_values(2)),
        "retry": st.just({"max_retries": 2, "backoff": 0.1}),
        "t": st.floats(0.1, 10),
        "h": st.just(1),
        "f": st.integers(1, 3),
    }
    for key in draw(st.lists(st.sampled_from(sorted(optional)), max_size=4, unique=True)):
        out[key] = draw(optional[key])
    return out


#: The test cluster's signing key (``NERV_SIGNING_KEY`` of a runner or hand-off under test), a signer
#: of it, and one of another key (a forger's).
SIGNING_KEY = "fuzz-signing-key"
SIGNER = Signer(SIGNING_KEY.encode())
OTHER_SIGNER = Signer(b"not the cluster's key")


def seal(body: Any, signer: Signer = SIGNER) -> str:
    """``body`` as the scheduler sends it: compact JSON, its signature in front (``Job.to_wire``)."""
    return signer.seal(json.dumps(body, separators=(",", ":")))


def signed_jobs(run_id: str = "run-1") -> st.SearchStrategy[str]:
    """A job message as the scheduler sends it: a valid job, signed with :data:`SIGNING_KEY`."""
    return jobs(run_id).map(seal)


def signed_malformed(run_id: str = "run-1") -> st.SearchStrategy[str]:
    """A properly signed body that is any JSON or a mutated job (types wrong, fields missing): it
    passes the signature check and meets ``parse_job``."""
    return st.one_of(json_values(), mutated(jobs(run_id))).map(seal)


def _hex_other(c: str) -> str:
    return "0" if c != "0" else "1"


@st.composite
def forged_wires(draw: st.DrawFn, run_id: str = "run-1") -> Any:
    """A job message the scheduler did not send: a signed one altered (a byte of the signature or of the
    JSON, truncated, the signature in upper case, a lone surrogate), an unsigned body (a dict, its JSON,
    JSON behind 64 made-up hex digits), or a body signed with another key."""
    body = draw(jobs(run_id))
    wire = seal(body)
    sig = SIGNATURE_CHARS
    how = draw(st.integers(0, 9))
    if how == 0:  # one character of the signature changed
        i = draw(st.integers(0, sig - 1))
        c = draw(st.sampled_from(["x", "é", " ", "\x00", _hex_other(wire[i])]))
        return wire[:i] + c + wire[i + 1 :]
    if how == 1:  # one character of the JSON changed (any change: the HMAC covers every byte)
        i = draw(st.integers(sig, len(wire) - 1))
        c = draw(st.characters(codec="utf-8").filter(lambda ch: ch != wire[i]))
        return wire[:i] + c + wire[i + 1 :]
    if how == 2:  # truncated, anywhere (down to nothing)
        return wire[: draw(st.integers(0, len(wire) - 1))]
    if how == 3:
        return body  # an unsigned dict, as the scheduler sent jobs before signing
    if how == 4:
        return json.dumps(body)
    if how == 5:
        return "0" * sig + json.dumps(body, separators=(",", ":"))
    if how == 6:
        return seal(body, OTHER_SIGNER)
    if how == 7 and any(c in "abcdef" for c in wire[:sig]):
        return wire[:sig].upper() + wire[sig:]
    if how == 8:  # a lone surrogate in the JSON (a Celery body's JSON can decode to one)
        i = draw(st.integers(sig, len(wire)))
        return wire[:i] + "\ud800" + wire[i:]
    # the signature of one body in front of another (mutated) one
    other = draw(mutated(st.just(body)))
    if other == body:
        other = {**body, "a": body["a"] + 1}
    return wire[:sig] + json.dumps(other, separators=(",", ":"))


def job_inputs(run_id: str = "run-1") -> st.SearchStrategy[Any]:
    """One job of a message: arbitrary JSON, valid signed jobs, forged ones, signed malformed bodies."""
    return st.one_of(json_values(), signed_jobs(run_id), forged_wires(run_id), signed_malformed(run_id))


def celery_bodies(run_id: str = "run-1") -> st.SearchStrategy[Any]:
    """A Celery message body as the worker decodes it (protocol 2: ``[args, kwargs, embed]``, the jobs
    being the args), or something else of any shape."""
    batch = st.lists(job_inputs(run_id), min_size=1, max_size=3)
    return st.one_of(
        json_values(),
        st.tuples(batch, st.just({}), st.just({})).map(list),
        mutated(
            st.tuples(st.lists(signed_jobs(run_id), min_size=1, max_size=3), st.just({}), st.just({})).map(
                list
            )
        ),
    )


def handoff_inputs(run_id: str = "run-1") -> st.SearchStrategy[Any]:
    """A hand-off list entry (one job message): bytes, text, JSON, signed, forged and signed malformed
    jobs (a dict becomes its JSON: a list entry is text)."""
    return st.one_of(
        st.binary(max_size=30),
        st.text(max_size=30),
        job_inputs(run_id).map(lambda v: v if isinstance(v, str) else json.dumps(v)),
    )


def kombu_envelope(body: bytes, task: str, queue: str, rng: random.Random) -> dict[str, Any]:
    """A Celery message as kombu's Redis transport LPUSHes it into a queue's list (``Channel._put``):
    Celery 5.7's protocol 2 headers and properties, the body base64-encoded (as nerv's scheduler sends)."""
    tid = str(uuid.UUID(int=rng.getrandbits(128)))
    return {
        "body": base64.b64encode(body).decode(),
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": {
            "lang": "py",
            "task": task,
            "id": tid,
            "shadow": None,
            "eta": None,
            "expires": None,
            "group": None,
            "group_index": None,
            "retries": 0,
            "timelimit": [8, 5],
            "root_id": tid,
            "parent_id": None,
            "argsrepr": "",
            "kwargsrepr": "{}",
            "origin": "fuzz",
            "ignore_result": None,
            "replaced_task_nesting": 0,
            "stamped_headers": None,
            "stamps": {},
        },
        "properties": {
            "correlation_id": tid,
            "reply_to": str(uuid.UUID(int=rng.getrandbits(128))),
            "delivery_mode": 2,
            "delivery_info": {"exchange": "", "routing_key": queue},
            "priority": 0,
            "body_encoding": "base64",
            "delivery_tag": str(uuid.UUID(int=rng.getrandbits(128))),
        },
    }


CELERY_EMBED = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}


@st.composite
def kombu_entries(draw: st.DrawFn) -> Any:
    """A queue list entry: bytes, JSON, a valid kombu message of a valid job, or one mutated."""
    rng = random.Random(draw(st.integers(0, 2**32)))
    body = json.dumps([[draw(signed_jobs())], {}, CELERY_EMBED]).encode()
    valid = kombu_envelope(body, FN, "cpu", rng)
    return draw(
        st.one_of(
            st.binary(max_size=40),
            json_values().map(json.dumps),
            st.just(json.dumps(valid)),
            mutated(st.just(valid)).map(json.dumps),
        )
    )


# --------------------------------------------------------------------------------------------------
# checkpoints


def checkpoint_inputs(encoded: dict[str, Any]) -> st.SearchStrategy[Any]:
    """What a stored checkpoint may hold: arbitrary JSON, or this valid encoding mutated."""
    return st.one_of(json_values(), mutated(st.just(encoded), max_changes=2))


# --------------------------------------------------------------------------------------------------
# intake requests (a stream entry's fields: ``i`` the request id, ``q`` the request, ``w`` a definition)

_SCHEDULE_NAMES = ["nightly", "hourly"]
request_ids = st.text("0123456789abcdef", min_size=32, max_size=32)


def _run_ids() -> st.SearchStrategy[str]:
    return st.sampled_from(["run-1", "other", "made-up-1", "no-such-run"])


def request_bodies() -> st.SearchStrategy[dict[str, Any]]:
    """A valid request (``Request.make``'s ``{"op", ...}``, before its fields are made), of every op,
    about the test's runs, made-up runs and schedules."""
    text = st.text(max_size=10)
    spec = st.fixed_dictionaries(
        {
            "name": st.sampled_from(_SCHEDULE_NAMES),
            "factory": st.just("tests.fuzzing:definitions"),
            "queue": st.sampled_from(constants.QUEUES),
            "cron": st.sampled_from([None, "*/5 * * * *", "0 3 * * *"]),
            "every": st.sampled_from([None, 60.0]),
            "overlap": st.sampled_from(["skip", "allow", "cancel"]),
            "catchup": st.sampled_from([False, True]),
            "timezone": st.sampled_from(["UTC", "Europe/Paris"]),
            "kwargs": st.dictionaries(st.text(string.ascii_lowercase, min_size=1, max_size=4), small_json),
        }
    )
    forms: list[st.SearchStrategy[dict[str, Any]]] = [
        st.fixed_dictionaries({"op": st.just("submit"), "run_id": _run_ids(), "idempotency_key": st.none()}),
        st.fixed_dictionaries({"op": st.just("cancel"), "run_id": _run_ids(), "reason": text}),
        st.fixed_dictionaries(
            {"op": st.just("rerun"), "run_id": _run_ids(), "tasks": st.none() | st.lists(ids, max_size=3)}
        ),
        st.fixed_dictionaries(
            {
                "op": st.just("signal"),
                "run_id": _run_ids(),
                "name": st.sampled_from(["s0", "s1", "nobody-waits"]),
                "payload": json_values(4),
            }
        ),
        st.fixed_dictionaries(
            {"op": st.just("set_limit"), "key": ids, "limit": st.none() | st.integers(-2, 2**40)}
        ),
        st.fixed_dictionaries({"op": st.just("schedule_set"), "spec": spec}),
        st.fixed_dictionaries(
            {
                "op": st.sampled_from(
                    ["schedule_pause", "schedule_resume", "schedule_trigger", "schedule_delete"]
                ),
                "name": st.sampled_from([*_SCHEDULE_NAMES, "no-such-schedule"]),
            }
        ),
        st.fixed_dictionaries({"op": st.just("clear_cache"), "task": st.none() | ids}),
    ]
    return st.one_of(forms)


def request_fields(body: dict[str, Any], rid: str, workflow: Any = None) -> dict[str, str]:
    """The stream entry of a request: its id, its JSON, a submission's definition as JSON text."""
    out = {constants.INTAKE_ID_FIELD: rid, constants.INTAKE_REQUEST_FIELD: json.dumps(body)}
    if workflow is not None:
        out[constants.INTAKE_WORKFLOW_FIELD] = workflow if isinstance(workflow, str) else json.dumps(workflow)
    return out


@st.composite
def valid_requests(draw: st.DrawFn) -> dict[str, str]:
    """A well-formed intake entry (what ``Request.fields`` makes): it parses; the scheduler may still
    refuse it (an unknown run, a wait no node has, a cycle)."""
    body = draw(request_bodies())
    workflow = draw(st.one_of(definitions(), broken_graphs())) if body["op"] == "submit" else None
    return request_fields(body, draw(request_ids), workflow)


@st.composite
def near_valid_requests(draw: st.DrawFn) -> Any:
    """A well-formed entry changed in one place: the request mutated (a field of the wrong type,
    missing, added, the op), the id broken, a field added or dropped, ``q`` or ``w`` no JSON, a
    definition on the wrong op, a definition of any shape."""
    fields = draw(valid_requests())
    how = draw(st.integers(0, 7))
    if how == 0:
        body = json.loads(fields[constants.INTAKE_REQUEST_FIELD])
        fields[constants.INTAKE_REQUEST_FIELD] = json.dumps(draw(mutated(st.just(body))))
    elif how == 1:
        fields[constants.INTAKE_ID_FIELD] = draw(
            st.sampled_from(["", "x" * 32, "0" * 31, "0" * 33, "A" * 32, " " + "0" * 31, "0" * 32 + "\n"])
        )
    elif how == 2:
        fields[draw(st.sampled_from(["x", "e", "t", ""]))] = draw(st.text(max_size=8))
    elif how == 3:
        del fields[draw(st.sampled_from(sorted(fields)))]
    elif how == 4:
        text = fields[constants.INTAKE_REQUEST_FIELD]
        fields[constants.INTAKE_REQUEST_FIELD] = text[: draw(st.integers(0, len(text) - 1))]
    elif how == 5:
        fields[constants.INTAKE_WORKFLOW_FIELD] = json.dumps(draw(definition_inputs()))
    elif how == 6 and constants.INTAKE_WORKFLOW_FIELD in fields:
        fields[constants.INTAKE_WORKFLOW_FIELD] = draw(st.sampled_from(["", "{", "[1]", "null", "x" * 40]))
    else:
        body = json.loads(fields[constants.INTAKE_REQUEST_FIELD])
        body["op"] = draw(st.sampled_from(["", "SUBMIT", "drop_all", "write_log", 5, None]))
        fields[constants.INTAKE_REQUEST_FIELD] = json.dumps(body)
    return fields


def intake_requests() -> st.SearchStrategy[Any]:
    """An intake stream entry's fields as the scheduler reads them (text to text): valid, near-valid,
    arbitrary JSON or text in ``q``, and arbitrary field maps; now and then (for ``Request.parse``
    alone) not even a map."""
    text_fields = st.dictionaries(st.sampled_from(["i", "q", "w", "x", ""]), st.text(max_size=20), max_size=4)
    return st.one_of(
        valid_requests(),
        near_valid_requests(),
        near_valid_requests(),
        st.builds(
            lambda rid, q: {constants.INTAKE_ID_FIELD: rid, constants.INTAKE_REQUEST_FIELD: q},
            request_ids,
            st.one_of(json_values().map(json.dumps), st.text(max_size=30)),
        ),
        text_fields,
    )


#: The wire forms and their strategies.
WIRE_FORMS: dict[str, Callable[..., st.SearchStrategy[Any]]] = {
    "definition": definition_inputs,
    "event": event_inputs,
    "celery-body": celery_bodies,
    "handoff": handoff_inputs,
    "kombu-message": kombu_entries,
    "checkpoint": checkpoint_inputs,
    "signed-job": job_inputs,
    "intake-request": intake_requests,
}


# --------------------------------------------------------------------------------------------------
# garbage for the drill (plain random, no Hypothesis: it runs against a live cluster)


def random_json(rng: random.Random, depth: int = 0) -> Any:
    """A random JSON value."""
    k = rng.randrange(8 if depth < 3 else 5)
    if k == 0:
        return None
    if k == 1:
        return rng.choice([True, False])
    if k == 2:
        return rng.choice([0, -1, 7, 2**64, 0.5, 1e300])
    if k in (3, 4):
        return "".join(rng.choice(string.printable) for _ in range(rng.randrange(12)))
    if k == 5:
        return [random_json(rng, depth + 1) for _ in range(rng.randrange(4))]
    return {str(random_json(rng, 3)): random_json(rng, depth + 1) for _ in range(rng.randrange(4))}


def _odd(rng: random.Random) -> Any:
    value = rng.choice(ODD_SCALARS)
    return None if isinstance(value, float) and value != value else value


def near_valid(rng: random.Random, valid: Any) -> Any:
    """``valid`` (JSON) mutated in one to three places."""
    out = valid
    for _ in range(rng.randint(1, 3)):
        out = mutate_with(rng, out, lambda: _copy(_odd(rng)) if rng.random() < 0.7 else random_json(rng))
    return out


def garbage_bytes(rng: random.Random, oversized: int = 200_000) -> bytes:
    """Random bytes, broken JSON or, now and then, an oversized blob."""
    k = rng.randrange(20)
    if k == 0:
        return b"[" * rng.randrange(1, 5_000)  # nesting the decoder has to refuse
    if k == 1:
        return b'{"t":"' + b"x" * oversized + b'"}'
    if k < 8:
        return bytes(rng.randrange(256) for _ in range(rng.randrange(1, 64)))
    text = json.dumps(random_json(rng))
    return text[: rng.randrange(len(text) + 1)].encode()
