"""The console's ASGI application: pages, the JSON API, the live event stream and the actions.

Built on Starlette; served by uvicorn (:func:`serve`, ``nerv ui``). Pages are rendered on the server
(Jinja templates shipped in the package); the run page's DAG, timeline and live updates are drawn by a
small script (``static/console.js``, also shipped: nothing is loaded from elsewhere, it works offline).

Every answer is a projection (:mod:`nerv_cluster.console.views`) of a fold of the run's log, read
through :class:`~nerv_cluster.console.store.RunStore`; ``?at=`` (a cursor or a count of events) gives
the same projection of the fold up to that point. The event stream (``/api/runs/{id}/events``) is
Server-Sent Events read from the run's log: each message's ``id:`` is its log entry id, so a browser
that reconnects sends it back as ``Last-Event-ID`` and the stream goes on right after it.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import AsyncIterator, Callable
from importlib import resources
from typing import Any
from urllib.parse import parse_qs

import anyio.to_thread
import jinja2
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.schemas import SchemaGenerator
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates

from nerv_cluster import constants, history
from nerv_cluster import state as st
from nerv_cluster.client import Client
from nerv_cluster.console import views
from nerv_cluster.console.auth import AuthConfig, AuthMiddleware, cookies, csrf_ok, new_csrf_token
from nerv_cluster.console.store import RunStore
from nerv_cluster.errors import (
    ConfigurationError,
    CursorError,
    NervError,
    RerunError,
    RunNotFoundError,
    SignalError,
    WorkflowError,
)
from nerv_cluster.model import RunStatus
from nerv_cluster.settings import Settings

_STATUSES = [s.value for s in RunStatus]

SCHEMA = SchemaGenerator(
    {
        "openapi": "3.0.0",
        "info": {
            "title": "nerv-cluster console API",
            "version": "1",
            "description": "Runs, their folded status (now or at any log cursor), their graph, and a "
            "resumable Server-Sent Events stream of their log.",
        },
    }
)


class Console:
    """The application's parts: the client, the store of folded runs, the credentials, the templates."""

    def __init__(self, client: Client, auth: AuthConfig, stream_seconds: float = 0.0) -> None:
        self.client = client
        self.store = RunStore(client)
        self.auth = auth
        self.stream_seconds = stream_seconds
        env = jinja2.Environment(
            loader=jinja2.PackageLoader("nerv_cluster.console", "templates"),
            autoescape=jinja2.select_autoescape(["html"]),
        )
        env.filters["when"] = _when
        env.filters["seconds"] = _seconds
        self.templates = Jinja2Templates(env=env)

    # -- helpers -------------------------------------------------------------------------------------

    def page(self, request: Request, template: str, **context: Any) -> Response:
        """Render a page, with the CSRF token its forms and scripts send back (set as a cookie)."""
        token = cookies(request.scope).get(constants.UI_CSRF_COOKIE) or new_csrf_token()
        context.update(csrf=token, auth=self.auth.enabled)
        response = self.templates.TemplateResponse(request, template, context)
        response.set_cookie(constants.UI_CSRF_COOKIE, token, httponly=False, samesite="strict", path="/")
        response.headers["cache-control"] = "no-store"
        # Scripts and styles from the console only (no inline script; style attributes allowed), and
        # never in another site's frame: no clicking the cancel button through a disguise.
        response.headers["content-security-policy"] = (
            "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
            "frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
        )
        response.headers["x-frame-options"] = "DENY"
        response.headers["x-content-type-options"] = "nosniff"
        response.headers["referrer-policy"] = "same-origin"
        return response

    def at(self, request: Request) -> str | None:
        return request.query_params.get("at") or None


def _when(ts: float | None) -> str:
    return "" if not ts else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


def _seconds(value: float | None) -> str:
    if value is None:
        return ""
    return f"{value * 1000:.0f} ms" if value < 1 else f"{value:.1f} s"


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def _guard(fn: Callable[..., Response]) -> Callable[..., Response]:
    """Map the library's errors on a handler to HTTP answers: 404 for an unknown run, 400 for a bad
    position or request, 409 for an action the run's state refuses."""

    def handler(*args: Any) -> Response:
        try:
            return fn(*args)
        except RunNotFoundError as exc:
            return _error(404, str(exc))
        except CursorError as exc:
            return _error(400, str(exc))
        except (RerunError, SignalError) as exc:
            return _error(409, str(exc))
        except WorkflowError as exc:
            return _error(400, str(exc))

    handler.__name__ = fn.__name__
    handler.__doc__ = fn.__doc__
    return handler


def create_app(
    client: Client | None = None,
    *,
    settings: Settings | None = None,
    auth: AuthConfig | None = None,
    stream_seconds: float | None = None,
) -> Starlette:
    """The console application for the cluster ``client`` talks to (default: one from ``settings`` or
    the environment), behind ``auth`` (default: from the environment, see
    :class:`~nerv_cluster.console.auth.AuthConfig`). ``stream_seconds``: how long one event stream
    lasts before the server ends it and the browser resumes it (default ``NERV_UI_STREAM_SECONDS``,
    0 = for as long as the client stays)."""
    settings = settings or (client.settings if client is not None else Settings.from_env())
    client = client or Client(settings=settings)
    auth = auth if auth is not None else AuthConfig.from_settings(settings)
    if stream_seconds is None:
        stream_seconds = settings.ui_stream_seconds
    con = Console(client, auth, stream_seconds)
    store = con.store

    # -- pages -----------------------------------------------------------------------------------------

    def runs_page(request: Request) -> Response:
        status = request.query_params.get("status", "")
        name = request.query_params.get("name", "")
        rows = views.nest_runs(views.filter_runs(store.runs(), status, name))
        template = "runs_rows.html" if request.query_params.get("fragment") else "runs.html"
        return con.page(request, template, rows=rows, status=status, name=name, statuses=_STATUSES)

    @_guard
    def run_page(request: Request) -> Response:
        run_id = request.path_params["run_id"]
        folded = store.folded(run_id)
        summary = views.run_summary(folded.run)
        return con.page(request, "run.html", run=summary, cursor=folded.cursor, events=folded.events)

    def login_page(request: Request) -> Response:
        return con.page(request, "login.html", failed=False)

    async def login(request: Request) -> Response:
        # The one form: parsed here (urlencoded), so the console needs no multipart parser.
        form = parse_qs((await request.body()).decode("utf-8", "replace"), max_num_fields=10)
        token = (form.get("token") or [""])[0]
        if not csrf_ok(request.scope, (form.get("csrf") or [""])[0]):
            return _error(403, "the form's CSRF token does not match; reload the page")
        if not auth.bearer_ok(token):
            return con.page(request, "login.html", failed=True)
        response = RedirectResponse("/", status_code=303)
        response.set_cookie(constants.UI_TOKEN_COOKIE, token, httponly=True, samesite="strict", path="/")
        return response

    def healthz(request: Request) -> Response:
        try:
            client.redis.ping()
        except Exception as exc:  # the probe's answer, whatever broke
            return JSONResponse({"ok": False, "error": str(exc)}, status_code=503)
        return JSONResponse({"ok": True})

    # -- JSON API ------------------------------------------------------------------------------------

    def api_runs(request: Request) -> Response:
        """The newest runs, each child run right after its parent.
        ---
        summary: List runs
        parameters:
          - name: status
            in: query
            schema: {type: string, enum: [PENDING, RUNNING, COMPLETED, FAILED, CANCELLED]}
          - {name: name, in: query, description: part of the name or run id, schema: {type: string}}
          - {name: limit, in: query, schema: {type: integer, default: 200}}
        responses:
          200:
            description: >
              runs: [{run_id, name, status, total, finished, progress, counts, submitted_at,
              started_at, finished_at, duration, parent, indent}]
        """
        try:
            limit = max(1, min(int(request.query_params.get("limit", constants.UI_RUNS_LIMIT)), 10_000))
        except ValueError:
            return _error(400, "limit must be a number")
        rows = views.filter_runs(
            store.runs(limit), request.query_params.get("status"), request.query_params.get("name")
        )
        return JSONResponse({"runs": views.nest_runs(rows)})

    @_guard
    def api_run(request: Request) -> Response:
        """A run's status with every task's status, attempts, worker, timings and error.
        ---
        summary: Run status (now, or at a point of its log)
        parameters:
          - {name: run_id, in: path, required: true, schema: {type: string}}
          - name: at
            in: query
            description: a log cursor (stream entry id, inclusive) or N (the first N events)
            schema: {type: string}
          - {name: tasks, in: query, description: 0 leaves the tasks out, schema: {type: integer}}
        responses:
          200:
            description: >
              the summary and tasks; now: cursor and events (how far the fold went); at a point:
              position (its count of events) and event (the last one folded)
          400: {description: bad position}
          404: {description: no such run}
        """
        run_id = request.path_params["run_id"]
        at = con.at(request)
        with_tasks = request.query_params.get("tasks", "1") != "0"
        if at is None:
            folded = store.folded(run_id)
            out = views.run_detail(folded.run, tasks=with_tasks)
            out.update(cursor=folded.cursor, events=folded.events, at=None)
        else:
            point = store.point(run_id, at)
            out = views.run_detail(point.run, tasks=with_tasks)
            out.update(at=at, position=point.events, event=views.event_dict(point.event))
        return JSONResponse(out)

    @_guard
    def api_graph(request: Request) -> Response:
        """The run's DAG by the planner's levels, with each task's status.
        ---
        summary: Run graph
        parameters:
          - {name: run_id, in: path, required: true, schema: {type: string}}
          - {name: at, in: query, description: a log cursor or a count of events, schema: {type: string}}
        responses:
          200:
            description: >
              levels [{level, tasks, group}], maps {id: {tasks, group}}, tasks {id: [name, status]},
              deps, critical, counts, status
        """
        run_id = request.path_params["run_id"]
        at = con.at(request)
        if at is None:
            folded = store.folded(run_id)
            run, extra = folded.run, {"cursor": folded.cursor, "events": folded.events}
        else:
            point = store.point(run_id, at)
            run = point.run
            extra = {"at": at, "position": point.events, "event": views.event_dict(point.event)}
        out = views.graph(run)
        out.update(
            extra, status=run.status.value, counts=run.counts, finished=run.finished_tasks, total=run.total
        )
        return JSONResponse(out)

    @_guard
    def api_timeline(request: Request) -> Response:
        """A Gantt chart of the run: a lane per worker, a bar per task, the critical path.
        ---
        summary: Run timeline
        parameters:
          - {name: run_id, in: path, required: true, schema: {type: string}}
          - {name: at, in: query, schema: {type: string}}
        responses:
          200: {description: "span, lanes [{worker, bars [[task, start, end, status]]}], critical, dropped"}
        """
        return JSONResponse(views.timeline(store.state(request.path_params["run_id"], con.at(request))))

    @_guard
    def api_task(request: Request) -> Response:
        """One task: arguments, shortened result, error and traceback, attempts, worker, timings, reason.
        ---
        summary: Task details
        parameters:
          - {name: run_id, in: path, required: true, schema: {type: string}}
          - {name: task_id, in: path, required: true, schema: {type: string}}
          - {name: at, in: query, schema: {type: string}}
        responses:
          200: {description: the task panel's data}
          404: {description: no such run or task}
        """
        run = store.state(request.path_params["run_id"], con.at(request))
        task_id = request.path_params["task_id"]
        if task_id not in run.tasks:
            return _error(404, f"no task {task_id!r} in run {run.run_id} (at this point of its log)")
        return JSONResponse(views.task_detail(run, task_id))

    @_guard
    def api_log(request: Request) -> Response:
        """Events of the run's log as JSON, each with its cursor.
        ---
        summary: Run event log
        parameters:
          - {name: run_id, in: path, required: true, schema: {type: string}}
          - name: after
            in: query
            description: a cursor (exclusive); without it, the last `limit` events
            schema: {type: string}
          - {name: limit, in: query, schema: {type: integer, default: 500}}
        responses:
          200: {description: "events [{cursor, type, task, attempt, ts, source, data}]"}
        """
        run_id = request.path_params["run_id"]
        try:
            limit = max(1, min(int(request.query_params.get("limit", 500)), 10_000))
        except ValueError:
            return _error(400, "limit must be a number")
        after = request.query_params.get("after")
        if after:
            history.parse_cursor(after)
            return JSONResponse({"events": store.log_page(run_id, after, limit)})
        return JSONResponse({"events": store.log_tail(run_id, limit)})

    async def api_events(request: Request) -> Response:
        """Server-Sent Events: the run's log, then live events; each `id:` is its log entry id.
        ---
        summary: Live event stream (resumable)
        description: >
          Each message's data is JSON {event, changes (task id -> new status), reload, status, counts,
          finished, total}. Reconnecting with the Last-Event-ID header (or ?after=cursor) resumes right
          after that entry, missing nothing.
        parameters:
          - {name: run_id, in: path, required: true, schema: {type: string}}
          - name: after
            in: query
            description: start after this cursor (Last-Event-ID wins)
            schema: {type: string}
          - {name: Last-Event-ID, in: header, schema: {type: string}}
        responses:
          200: {description: text/event-stream}
        """
        run_id = request.path_params["run_id"]
        after = request.headers.get("last-event-id") or request.query_params.get("after") or "0-0"
        try:
            if after not in ("0-0", "-", "0"):
                history.parse_cursor(after)
            await run_in_threadpool(client.log.require_run, run_id)
            start = (
                None
                if after in ("0-0", "-", "0")
                else await run_in_threadpool(store.state_after, run_id, after)
            )
        except RunNotFoundError as exc:
            return _error(404, str(exc))
        except CursorError as exc:
            return _error(400, str(exc))
        return StreamingResponse(
            _stream(con, request, run_id, after, start),
            media_type="text/event-stream",
            headers={"cache-control": "no-store", "x-accel-buffering": "no"},
        )

    # -- actions -----------------------------------------------------------------------------------------

    async def _action(request: Request, act: Callable[[dict[str, Any]], Any]) -> Response:
        try:
            body = await request.json() if await request.body() else {}
        except ValueError:
            return _error(400, "the body must be JSON")
        if not isinstance(body, dict):
            return _error(400, "the body must be a JSON object")
        # A request authenticated by a bearer header cannot come from a browser tricked into it.
        if request.scope.get("state", {}).get("auth") != "bearer" and not csrf_ok(request.scope):
            return _error(403, "CSRF check failed: send the X-CSRF-Token header from the page's cookie")
        try:
            result = await run_in_threadpool(act, body)
        except RunNotFoundError as exc:
            return _error(404, str(exc))
        except (RerunError, SignalError) as exc:
            return _error(409, str(exc))
        except NervError as exc:
            return _error(400, str(exc))
        return JSONResponse({"ok": True, **(result or {})})

    async def api_cancel(request: Request) -> Response:
        """Cancel a run: nothing new starts, running tasks are revoked.
        ---
        summary: Cancel a run
        parameters: [{name: run_id, in: path, required: true, schema: {type: string}}]
        requestBody:
          content: {application/json: {schema: {type: object, properties: {reason: {type: string}}}}}
        responses:
          200: {description: requested}
          403: {description: CSRF check failed}
          404: {description: no such run}
        """
        run_id = request.path_params["run_id"]
        return await _action(
            request, lambda b: client.cancel(run_id, str(b.get("reason") or "cancelled from the console"))
        )

    async def api_rerun(request: Request) -> Response:
        """Rerun a finished run from where it failed (or the given tasks and their descendants).
        ---
        summary: Rerun a run
        parameters: [{name: run_id, in: path, required: true, schema: {type: string}}]
        requestBody:
          content:
            application/json:
              schema: {type: object, properties: {tasks: {type: array, items: {type: string}}}}
        responses:
          200: {description: requested}
          409: {description: not finished, or nothing to rerun}
        """
        run_id = request.path_params["run_id"]

        def act(body: dict[str, Any]) -> None:
            tasks = body.get("tasks") or None
            if tasks is not None and not (isinstance(tasks, list) and all(isinstance(t, str) for t in tasks)):
                raise RerunError("tasks must be a list of task ids")
            client.rerun(run_id, tasks=tasks)

        return await _action(request, act)

    async def api_signal(request: Request) -> Response:
        """Send a signal (a name and a JSON payload) to a run's wait_for node.
        ---
        summary: Signal a run
        parameters: [{name: run_id, in: path, required: true, schema: {type: string}}]
        requestBody:
          content:
            application/json:
              schema: {type: object, required: [name], properties: {name: {type: string}, payload: {}}}
        responses:
          200: {description: "sent; first: whether it was the first of its name"}
          409: {description: no node waits for it, or the run is over}
        """
        run_id = request.path_params["run_id"]

        def act(body: dict[str, Any]) -> dict[str, Any]:
            name = body.get("name")
            if not isinstance(name, str) or not name:
                raise SignalError("give the signal's name")
            return {"first": client.signal(run_id, name, body.get("payload"))}

        return await _action(request, act)

    def openapi(request: Request) -> Response:
        return JSONResponse(SCHEMA.get_schema(routes=app.routes))

    static = resources.files("nerv_cluster.console") / "static"
    routes = [
        Route("/", runs_page, include_in_schema=False),
        Route("/runs/{run_id}", run_page, include_in_schema=False),
        Route("/login", login_page, methods=["GET"], include_in_schema=False),
        Route("/login", login, methods=["POST"], include_in_schema=False),
        Route("/healthz", healthz, include_in_schema=False),
        Route("/api/runs", api_runs),
        Route("/api/runs/{run_id}", api_run),
        Route("/api/runs/{run_id}/graph", api_graph),
        Route("/api/runs/{run_id}/timeline", api_timeline),
        Route("/api/runs/{run_id}/log", api_log),
        Route("/api/runs/{run_id}/events", api_events),
        Route("/api/runs/{run_id}/tasks/{task_id:path}", api_task),
        Route("/api/runs/{run_id}/cancel", api_cancel, methods=["POST"]),
        Route("/api/runs/{run_id}/rerun", api_rerun, methods=["POST"]),
        Route("/api/runs/{run_id}/signal", api_signal, methods=["POST"]),
        Route("/api/openapi.json", openapi, include_in_schema=False),
        Mount("/static", app=StaticFiles(directory=str(static)), name="static"),
    ]

    async def not_found(request: Request, exc: Exception) -> Response:
        code = exc.status_code if isinstance(exc, HTTPException) else 500
        if request.url.path.startswith("/api/"):
            return _error(code, getattr(exc, "detail", "") or "error")
        return HTMLResponse(f"<h1>{code}</h1>", status_code=code)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        # Each open event stream waits on Redis in a worker thread (half a second at a time): make room
        # for many of them beside the page and API handlers, which run in the same pool.
        limiter = anyio.to_thread.current_default_thread_limiter()
        limiter.total_tokens = max(limiter.total_tokens, constants.UI_THREADS)
        yield

    app = Starlette(
        routes=routes,
        middleware=[Middleware(AuthMiddleware, auth=auth)],
        exception_handlers={404: not_found, 405: not_found},
        lifespan=lifespan,
    )
    app.state.console = con
    return app


async def _stream(
    con: Console, request: Request, run_id: str, after: str, start: st.RunState | None
) -> AsyncIterator[str]:
    """The body of an event stream: a ``retry:`` hint, then one message per log entry after ``after``
    (its ``id:`` the entry id, its data :func:`views.sse_message`), keep-alive comments while nothing
    comes, until the client leaves or the stream's time is up (the browser then resumes it)."""
    log = con.client.log
    state: dict[str, Any] = {"run": start, "last": after}
    ends = time.monotonic() + con.stream_seconds if con.stream_seconds > 0 else None

    def step() -> str:
        batch = log.follow_run(run_id, state["last"], constants.UI_STREAM_BLOCK_MS, count=2_000)
        run = state["run"]
        parts: list[str] = []
        for entry_id, ev in batch:
            new = st.apply_to_run(run, ev)
            if new is None:
                continue  # an event before the run's submission changes nothing
            data = json.dumps(views.sse_message(ev, run, new), separators=(",", ":"), default=str)
            parts.append(f"id: {entry_id}\ndata: {data}\n\n")
            run = new
        state["run"] = run
        state["last"] = batch.upto or state["last"]
        return "".join(parts)

    yield f"retry: {constants.UI_STREAM_RETRY_MS}\n\n"
    quiet = 0.0
    while True:
        if ends is not None and time.monotonic() >= ends:
            return
        if await request.is_disconnected():
            return
        chunk = await run_in_threadpool(step)
        if chunk:
            quiet = time.monotonic()
            yield chunk
        elif time.monotonic() - quiet > 10:
            quiet = time.monotonic()
            yield ": keep-alive\n\n"


def serve(
    host: str = constants.UI_DEFAULT_HOST,
    port: int = constants.UI_DEFAULT_PORT,
    *,
    settings: Settings | None = None,
    auth: AuthConfig | None = None,
    log_level: str = "info",
) -> None:
    """Serve the console with uvicorn until interrupted; :class:`ConfigurationError` for a non-loopback
    ``host`` without credentials (see :func:`~nerv_cluster.console.auth.check_bind`)."""
    import uvicorn

    from nerv_cluster.console.auth import check_bind

    settings = settings or Settings.from_env()
    auth = auth if auth is not None else AuthConfig.from_settings(settings)
    check_bind(host, auth)
    app = create_app(settings=settings, auth=auth)
    try:
        uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=2)
    except SystemExit as exc:  # uvicorn exits when it cannot bind
        raise ConfigurationError(f"the console cannot listen on {host}:{port}") from exc


__all__ = ["Console", "create_app", "serve"]
