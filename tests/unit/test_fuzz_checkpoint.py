"""Fuzzing checkpoints (issue 13, point 7): a stored checkpoint decodes to a sound run or is refused with
a :class:`MalformedCheckpointError` (the scheduler then replays the run's whole log), never another
exception; and a new leader's loading skips what it cannot read."""

from __future__ import annotations

import json
import logging
from typing import Any

from hypothesis import example, given
from hypothesis import strategies as hst

from nerv_cluster import checkpoint
from nerv_cluster import state as st
from nerv_cluster.errors import MalformedCheckpointError
from scheduler.checkpointer import load
from tests import fuzzing
from tests.unit.helpers import completes, diamond, fails, submitted, td, wdef
from tests.unit.test_fuzz_fold import check_usable


def _run() -> st.RunState:
    state = st.fold(
        [
            submitted(wdef(td("a"), td("b", "a"), td("c", "a", trigger="all_done"), td("d", "b", "c"))),
            *completes("a", [1, "x"]),
            *fails("b"),
        ]
    )
    return state.runs["run-1"]


RUN = _run()
ENCODED = json.loads(json.dumps(checkpoint.encode(RUN)))


def test_a_checkpoint_decodes_to_the_run_it_was_made_of() -> None:
    assert checkpoint.decode(ENCODED) == RUN
    assert checkpoint.decode(
        json.loads(json.dumps(checkpoint.encode(st.fold([submitted(diamond())]).runs["run-1"])))
    )


@fuzzing.examples(80)
@given(fuzzing.checkpoint_inputs(ENCODED))
# Found by this fuzzer: each raised AttributeError or WorkflowError out of decode (the loader caught
# only KeyError, TypeError and ValueError: a new leader's takeover failed), or decoded a state whose
# tally, id sets or task fields did not hold together.
@example([])
@example({**ENCODED, "tasks": []})
@example(
    {**ENCODED, "definition": {"name": "x", "tasks": [{"id": "a", "fn": "f", "retry": {"max_retries": -1}}]}}
)
@example({**ENCODED, "tally": [9, 0, 0, 0, 0, 0, 0, 0]})
@example({**ENCODED, "ready": ["ghost"]})
@example({**ENCODED, "tally": [1, 0, 0, 1, float("inf"), 0, 0]})  # OverflowError from int()
@example({**ENCODED, "tasks": {**ENCODED["tasks"], "a": ["COMPLETED", "1", *ENCODED["tasks"]["a"][2:]]}})
def test_any_checkpoint_decodes_to_a_sound_run_or_is_refused(data: Any) -> None:
    try:
        run = checkpoint.decode(data)
    except MalformedCheckpointError as exc:
        assert str(exc)
        return
    check_usable(run)


class StoredCheckpoints:
    """The event log's checkpoint read, over what the store holds."""

    def __init__(self, raws: dict[str, str]) -> None:
        self.raws = raws

    def read_checkpoints(self, run_ids: list[str]) -> dict[str, str]:
        return {r: self.raws[r] for r in run_ids if r in self.raws}


@fuzzing.examples(40)
@given(
    hst.one_of(
        hst.binary(max_size=20).map(lambda b: b.decode("latin-1")),
        fuzzing.json_values().map(json.dumps),
        fuzzing.mutated(hst.just({"upto": "5-0", "count": 3, "state": ENCODED})).map(json.dumps),
    )
)
@example("{not json")  # json.loads raised out of read_checkpoints: the whole takeover failed
@example(json.dumps({"upto": "5-0", "count": 3, "state": []}))
def test_a_new_leader_loads_the_checkpoints_it_can_read_and_skips_the_others(raw: str) -> None:
    good = json.dumps({"upto": "9-0", "count": 4, "state": ENCODED})
    logging.getLogger("nerv.scheduler").disabled = True
    try:
        loaded = load(StoredCheckpoints({"good": good, "bad": raw}), ["good", "bad"])  # type: ignore[arg-type]
    finally:
        logging.getLogger("nerv.scheduler").disabled = False
    assert loaded["good"] == ("9-0", 4, RUN)
    if "bad" in loaded:
        check_usable(loaded["bad"][2])
