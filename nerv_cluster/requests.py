"""Clients' requests to the scheduler (issue 13): the intake's wire form and the scheduler's answers.

Clients ask; the scheduler decides. A client never writes a run log, the limits or the schedules stream:
it appends a :class:`Request` to the intake stream (``Keys.intake``) and waits on its own reply list
(``Keys.intake_reply``) for the answer the scheduler pushes there once it has checked the request and
applied it (fenced by its lease). One stream entry is one request: its id, the request as JSON, and for a
submission the workflow definition as JSON of its own (so the scheduler writes it into the run log as it
came, without encoding a 60 MB definition again).

Invariant: :meth:`Request.parse` returns a request whose every field has its type and is within its
bound, or raises :class:`~nerv_cluster.errors.MalformedRequestError` (or, for a submission over
``max_submission_bytes``, :class:`~nerv_cluster.errors.PayloadTooLargeError`); it decodes nothing big.
An answer is JSON: ``{"ok": true, ...}`` with what the call returns, or ``{"ok": false, "error": {"type",
"message"}}``, which :func:`read_answer` raises as the same error class the client raises itself.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from nerv_cluster import constants, errors
from nerv_cluster.errors import MalformedRequestError, NervError, PayloadTooLargeError, WorkflowError
from nerv_cluster.jsonform import compact

#: A request id: 32 lowercase hex digits (it goes into the reply and done keys).
_ID_RE = re.compile(r"[0-9a-f]{32}")

_ANY = object()  # a field that may hold any JSON value
#: Each operation's fields and the types each may have (None: JSON null).
SCHEMAS: Mapping[str, Mapping[str, Any]] = {
    "submit": {"run_id": (str,), "idempotency_key": (str, type(None))},
    "cancel": {"run_id": (str,), "reason": (str,)},
    "rerun": {"run_id": (str,), "tasks": (list, type(None))},
    "signal": {"run_id": (str,), "name": (str,), "payload": _ANY},
    "set_limit": {"key": (str,), "limit": (int, type(None))},
    "schedule_set": {"spec": (dict,)},
    "schedule_pause": {"name": (str,)},
    "schedule_resume": {"name": (str,)},
    "schedule_trigger": {"name": (str,)},
    "schedule_delete": {"name": (str,)},
    "clear_cache": {"task": (str, type(None))},
}
OPS = tuple(SCHEMAS)


@dataclass(frozen=True, slots=True)
class Bounds:
    """How big a request may be: its own JSON, and a submission's workflow definition."""

    max_request_bytes: int = constants.DEFAULT_MAX_PAYLOAD_BYTES + constants.INTAKE_REQUEST_OVERHEAD_BYTES
    max_submission_bytes: int = constants.DEFAULT_MAX_SUBMISSION_BYTES

    @classmethod
    def of(cls, settings: Any) -> Bounds:
        """The bounds of these settings: a request carries at most a payload (a schedule's kwargs, a
        signal's) and its own fields; a submission at most ``max_submission_bytes`` of definition."""
        largest = max(settings.max_payload_bytes, settings.max_signal_bytes)
        return cls(largest + constants.INTAKE_REQUEST_OVERHEAD_BYTES, settings.max_submission_bytes)


@dataclass(frozen=True, slots=True)
class Request:
    """One client request: ``op`` (one of :data:`OPS`), its fields ``body``, and for ``submit`` the
    workflow definition's JSON text ``workflow``."""

    op: str
    body: Mapping[str, Any]
    workflow: str | None = None
    id: str = field(default_factory=lambda: uuid.uuid4().hex)

    @classmethod
    def make(cls, op: str, workflow: str | None = None, **body: Any) -> Request:
        """A new request (a fresh id)."""
        return cls(op, body, workflow)

    @property
    def run_id(self) -> str | None:
        """The run the request is about, if any."""
        rid = self.body.get("run_id")
        return rid if isinstance(rid, str) else None

    def fields(self) -> dict[str, str]:
        """The stream entry's fields."""
        out = {
            constants.INTAKE_ID_FIELD: self.id,
            constants.INTAKE_REQUEST_FIELD: compact({"op": self.op, **self.body}),
        }
        if self.workflow is not None:
            out[constants.INTAKE_WORKFLOW_FIELD] = self.workflow
        return out

    @classmethod
    def parse(cls, fields: Any, bounds: Bounds = Bounds()) -> Request:
        """The request of an intake entry's fields; :class:`MalformedRequestError` for anything that is
        not a well-formed request, :class:`PayloadTooLargeError` for a submission over its bound."""
        rid = request_id(fields)
        if rid is None:
            raise MalformedRequestError("no request id (32 lowercase hex digits)")
        extra = set(fields) - {
            constants.INTAKE_ID_FIELD,
            constants.INTAKE_REQUEST_FIELD,
            constants.INTAKE_WORKFLOW_FIELD,
        }
        if extra:
            raise MalformedRequestError(f"unknown fields {sorted(extra)!r:.200}")
        text = fields.get(constants.INTAKE_REQUEST_FIELD)
        if not isinstance(text, str):
            raise MalformedRequestError("no request")
        if len(text) > bounds.max_request_bytes:
            raise MalformedRequestError(
                f"the request is {len(text)} bytes; the limit is {bounds.max_request_bytes}"
            )
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise MalformedRequestError(f"the request is not JSON: {exc}") from None
        except RecursionError:  # nesting deeper than the decoder goes: no request is that deep
            raise MalformedRequestError("the request is not JSON: nested too deeply") from None
        if not isinstance(data, dict):
            raise MalformedRequestError("the request is not a JSON object")
        op = data.pop("op", None)
        schema = SCHEMAS.get(op) if isinstance(op, str) else None
        if schema is None:
            raise MalformedRequestError(f"unknown operation {op!r:.80}; expected one of {', '.join(OPS)}")
        if set(data) != set(schema):
            missing, unknown = sorted(set(schema) - set(data)), sorted(set(data) - set(schema))
            raise MalformedRequestError(f"{op}: missing fields {missing!r}, unknown fields {unknown!r:.200}")
        for name, types in schema.items():
            value = data[name]
            if types is _ANY:
                continue
            if isinstance(value, bool) and bool not in types:  # JSON true is no count
                raise MalformedRequestError(f"{op}: {name} must be {_names(types)}, got {value!r:.80}")
            if not isinstance(value, types):
                raise MalformedRequestError(f"{op}: {name} must be {_names(types)}, got {value!r:.80}")
        workflow = fields.get(constants.INTAKE_WORKFLOW_FIELD)
        if op == "submit":
            if not isinstance(workflow, str):
                raise MalformedRequestError("submit: no workflow definition")
            if len(workflow) > bounds.max_submission_bytes:
                raise PayloadTooLargeError(
                    f"run {data['run_id']!r:.140}: the workflow definition is {len(workflow)} bytes of JSON; "
                    f"the limit is {bounds.max_submission_bytes} (NERV_MAX_SUBMISSION_BYTES)"
                )
        elif workflow is not None:
            raise MalformedRequestError(f"{op}: a workflow definition only goes with a submit")
        return cls(op, data, workflow, rid)


def _names(types: tuple[type, ...]) -> str:
    return " or ".join("null" if t is type(None) else t.__name__ for t in types)


def request_id(fields: Any) -> str | None:
    """The id of an intake entry, when it has a well-formed one (the scheduler can answer it then)."""
    rid = fields.get(constants.INTAKE_ID_FIELD) if isinstance(fields, Mapping) else None
    return rid if isinstance(rid, str) and _ID_RE.fullmatch(rid) else None


def decode_workflow(text: str) -> Any:
    """A submission's workflow definition, decoded (once: the scheduler checks and folds this)."""
    try:
        return json.loads(text)
    except ValueError as exc:
        raise WorkflowError(f"the workflow definition is not JSON: {exc}") from None
    except RecursionError:  # nesting deeper than the decoder goes: a clear refusal, not a crash's name
        raise WorkflowError("the workflow definition is not JSON: nested too deeply") from None


def submitted_json(event_head: Mapping[str, Any], workflow: str, source: str) -> str:
    """The JSON of a WORKFLOW_SUBMITTED event whose fields other than its data are ``event_head``
    (``Event.to_dict`` without ``d`` and ``s``), carrying the workflow definition text ``workflow`` as
    it came: the same text ``Event.to_json`` gives for the decoded definition, but without encoding it
    again. ``workflow`` must be the text of one JSON object (:func:`decode_workflow` read it)."""
    head = compact(dict(event_head))
    return f'{head[:-1]},"d":{{"workflow":{workflow}}},"s":{compact(source)}}}'


# -- answers ------------------------------------------------------------------------------------------


def ok(**values: Any) -> str:
    """The answer of a request applied: what the client's call returns."""
    return compact({"ok": True, **values})


def refusal(exc: BaseException) -> str:
    """The answer of a request refused: the error the client raises (a non-nerv exception, which a
    malformed definition can make decoding raise, as a :class:`WorkflowError`)."""
    if isinstance(exc, NervError):
        kind, message = type(exc).__name__, str(exc)
    else:
        kind, message = "WorkflowError", f"invalid request: {type(exc).__name__}: {exc}"
    error: dict[str, Any] = {"type": kind, "message": message[: constants.MAX_ERROR_MESSAGE_CHARS]}
    cycle = getattr(exc, "cycle", None)
    if isinstance(exc, errors.CycleError) and isinstance(cycle, list):
        error["cycle"] = [str(t) for t in cycle[:1000]]
    return compact({"ok": False, "error": error})


def error_of(error: Any) -> NervError:
    """The exception an answer's error stands for: the nerv error class of that name (any other name,
    or a malformed error, gives a :class:`NervError`)."""
    if not isinstance(error, Mapping):
        return NervError(f"the scheduler refused the request: {error!r:.200}")
    kind, message = error.get("type"), str(error.get("message", ""))
    cls = getattr(errors, kind, None) if isinstance(kind, str) else None
    if not (isinstance(cls, type) and issubclass(cls, NervError)):
        return NervError(f"{kind}: {message}")
    exc = cls.__new__(cls)  # not __init__: some take more than a message (CycleError, ReplicationError)
    NervError.__init__(exc, message)
    if cls is errors.CycleError:
        exc.cycle = list(error.get("cycle") or [])  # type: ignore[attr-defined]
    return exc


def read_answer(text: Any) -> dict[str, Any]:
    """The values of an answer; raises the error of a refusal (a :class:`NervError` for an answer
    that is no answer)."""
    try:
        data = json.loads(text)
    except (TypeError, ValueError):
        raise NervError(f"the scheduler's answer is not JSON: {text!r:.200}") from None
    if not isinstance(data, dict):
        raise NervError(f"the scheduler's answer is not a JSON object: {text!r:.200}")
    if data.get("ok") is True:
        return data
    raise error_of(data.get("error"))


__all__ = [
    "OPS",
    "SCHEMAS",
    "Bounds",
    "Request",
    "decode_workflow",
    "error_of",
    "ok",
    "read_answer",
    "refusal",
    "request_id",
    "submitted_json",
]
