"""The console in a real browser (chromium through Playwright) against a real cluster.

Each test names the promise of issue 12 it checks: the runs list, the DAG drawn in full, live
statuses, resuming a dropped stream without a gap, the time-travel slider, cancel from the page, and
authentication.
"""

from __future__ import annotations

import time
from typing import Any

import httpx
import nerv_testtasks as tt
import pytest

from nerv_cluster import RunStatus, Workflow
from tests.browser.conftest import Console

pytestmark = pytest.mark.timeout(60)


def _open_run(page: Any, run_id: str) -> None:
    page.goto(f"/runs/{run_id}")
    page.wait_for_selector("body[data-ready='1']", timeout=10_000)


def _node_statuses(page: Any) -> dict[str, str]:
    return page.eval_on_selector_all(
        "#dag [data-task-id]",
        "els => Object.fromEntries(els.map(e => [e.dataset.taskId,"
        " [...e.classList].find(c => c.startsWith('s-')).slice(2)]))",
    )


def test_runs_list_shows_a_finished_run(console: Console, page: Any) -> None:
    wf = Workflow("listed")
    wf.add(tt.add, 1, 2)
    run_id = console.client.submit(wf)
    assert console.client.wait(run_id, timeout=20).status is RunStatus.COMPLETED
    page.goto("/")
    row = page.locator(f"tr[data-run-id='{run_id}']")
    row.wait_for(timeout=5_000)
    assert row.get_attribute("data-status") == "COMPLETED"
    assert "1/1" in row.inner_text()
    # The filters: by status, by name.
    page.goto("/?status=FAILED")
    assert page.locator(f"tr[data-run-id='{run_id}']").count() == 0
    page.goto("/?name=listed")
    assert page.locator(f"tr[data-run-id='{run_id}']").count() == 1
    # Child runs come right under their parents, indented.
    wf = Workflow("parent")
    wf.add(tt.fib, 3, id="fib")
    parent = console.client.submit(wf)
    assert console.client.wait(parent, timeout=30).results == {"fib": 2}
    page.goto("/")
    rows = page.eval_on_selector_all(
        "tr.run-row", "rs => rs.map(r => [r.dataset.runId, r.dataset.parent || null, +r.dataset.indent])"
    )
    ids = [r[0] for r in rows]
    children = [r for r in rows if r[1] == parent]
    assert children and all(indent == 1 for _, _, indent in children)
    for child, _, _ in children:  # each under its parent (after it, before the next top-level run)
        assert ids.index(parent) < ids.index(child)
        assert all(r[2] > 0 for r in rows[ids.index(parent) + 1 : ids.index(child) + 1])


def test_run_page_draws_every_node_of_a_50_task_dag(console: Console, page: Any) -> None:
    wf = Workflow("fifty")
    roots = [wf.add(tt.add, i, 1, id=f"root{i}") for i in range(10)]
    mids = [wf.add(tt.total, roots[i % 10], roots[(i + 3) % 10], id=f"mid{i}") for i in range(30)]
    for i in range(10):
        wf.add(tt.total, *mids[i * 3 : i * 3 + 3], id=f"sink{i}")
    assert len(wf) == 50
    run_id = console.client.submit(wf)
    assert console.client.wait(run_id, timeout=30).status is RunStatus.COMPLETED
    _open_run(page, run_id)
    statuses = _node_statuses(page)
    assert set(statuses) == {t.id for t in wf.tasks}
    assert set(statuses.values()) == {"COMPLETED"}
    # Laid out by the planner's levels: three columns of 10, 30 and 10 nodes.
    sizes = page.eval_on_selector_all(
        ".level", "cols => cols.map(c => c.querySelectorAll('[data-task-id]').length)"
    )
    assert sizes == [10, 30, 10]
    # The task panel: a click shows the task's arguments, result and worker.
    page.click("[data-task-id='root3']")
    panel = page.locator("#task-body[data-task-id='root3']")
    panel.wait_for(timeout=5_000)
    text = panel.inner_text()
    assert "nerv_testtasks.add" in text and "3, 1" in text and "4" in text


def _slow_chain(name: str, n: int, seconds: float) -> Workflow:
    wf = Workflow(name)
    prev = None
    for i in range(n):
        prev = wf.add(tt.slow, seconds, id=f"step{i}", dependencies=[prev] if prev else [])
    return wf


def test_statuses_change_live_while_a_run_runs(console: Console, page: Any) -> None:
    wf = _slow_chain("live", 6, 0.6)
    run_id = console.client.submit(wf)
    _open_run(page, run_id)
    page.evaluate("window.notReloaded = true")
    # A node turns RUNNING, then COMPLETED, while the run goes on: pushed, not reloaded. The node
    # watched is the first one not yet started when the page is drawn (a slow browser start on a
    # busy machine may find the first steps done already), and never the last one.
    drawn = _node_statuses(page)
    waiting = [f"step{i}" for i in range(5) if drawn[f"step{i}"] not in ("RUNNING", "COMPLETED")]
    assert waiting, f"the run was nearly done before the page was drawn: {drawn}"
    step = waiting[0]
    page.wait_for_selector(f"[data-task-id='{step}'].s-RUNNING", timeout=10_000)
    page.wait_for_selector(f"[data-task-id='{step}'].s-COMPLETED", timeout=10_000)
    assert console.client.status(run_id).status is RunStatus.RUNNING
    assert console.client.wait(run_id, timeout=20).status is RunStatus.COMPLETED
    ended = time.monotonic()
    page.wait_for_selector("#run-status:text('COMPLETED')", timeout=3_000)
    assert set(_node_statuses(page).values()) == {"COMPLETED"}
    assert page.evaluate("window.notReloaded") is True
    # Within a second of their events: each message's arrival against its log entry's time (the
    # entry id's milliseconds, Redis's clock on this same machine).
    lags = page.evaluate("window.nervStream.lags")
    assert lags, "no live message arrived"
    lags.sort()
    assert lags[len(lags) // 2] < 1000, lags
    assert time.monotonic() - ended < 3


def test_a_dropped_stream_resumes_without_a_gap(console: Console, page: Any) -> None:
    # The console ends every stream after 1.5 s; the browser reconnects with Last-Event-ID.
    wf = _slow_chain("resume", 6, 0.6)
    run_id = console.client.submit(wf)
    _open_run(page, run_id)
    first = page.evaluate("document.getElementById('run').dataset.cursor")
    assert console.client.wait(run_id, timeout=30).status is RunStatus.COMPLETED
    page.wait_for_selector("#run-status:text('COMPLETED')", timeout=5_000)
    stream = page.evaluate("({ids: window.nervStream.ids, dups: window.nervStream.duplicates,"
                           " opens: window.nervStream.opens, start: window.nervStream.start})")  # fmt: skip
    assert stream["opens"] >= 2, "the stream was never dropped and resumed"
    assert stream["dups"] == 0
    logged = [e.cursor for e in console.client.events(run_id, follow=False)]
    # Every entry after the page's starting point, each once, in order.
    start = logged.index(stream["start"]) + 1 if stream["start"] not in ("0-0", "") else 0
    assert stream["ids"] == logged[start:]
    assert first  # the page knew where it started


def test_the_slider_shows_an_earlier_state(console: Console, page: Any) -> None:
    wf = _slow_chain("travel", 3, 0.05)
    run_id = console.client.submit(wf)
    assert console.client.wait(run_id, timeout=20).status is RunStatus.COMPLETED
    events = list(console.client.events(run_id, follow=False))
    _open_run(page, run_id)
    assert set(_node_statuses(page).values()) == {"COMPLETED"}

    def slide(to: int) -> dict[str, str]:
        page.eval_on_selector(
            "#slider", "(e, v) => { e.value = v; e.dispatchEvent(new Event('input')); }", str(to)
        )
        page.wait_for_selector(f"#dag[data-at='{to}']", timeout=5_000)
        return _node_statuses(page)

    assert slide(1) == {"step0": "READY", "step1": "PENDING", "step2": "PENDING"}
    assert "state after event 1" in page.inner_text("#slider-label")
    assert page.inner_text("#run-status") == "PENDING"
    # Right after step0's completion: step0 COMPLETED, step1 READY, step2 PENDING.
    k = next(i for i, e in enumerate(events) if e.type.value == "TASK_COMPLETED" and e.task_id == "step0")
    want = console.client.status(run_id, at=k + 1)
    shown = slide(k + 1)
    assert shown == {tid: t.status.value for tid, t in want.tasks.items()}
    assert shown["step0"] == "COMPLETED" and shown["step2"] == "PENDING"
    assert f"state after event {k + 1} of {len(events)}: TASK_COMPLETED step0" in page.inner_text(
        "#slider-label"
    )
    # A click on an event of the log goes to the state right after it, and moves the slider there.
    first_start = next(i for i, e in enumerate(events) if e.type.value == "TASK_STARTED")
    page.click(f"#log-body tr[data-cursor='{events[first_start].cursor}']")
    page.wait_for_selector(f"#dag[data-at='{events[first_start].cursor}']", timeout=5_000)
    assert _node_statuses(page)["step0"] == "RUNNING"
    assert page.eval_on_selector("#slider", "e => e.value") == str(first_start + 1)
    assert page.locator("#log-body tr.at").get_attribute("data-cursor") == events[first_start].cursor
    # Back to the end: live again.
    slide_end = len(events)
    page.eval_on_selector(
        "#slider", "(e, v) => { e.value = v; e.dispatchEvent(new Event('input')); }", str(slide_end)
    )
    page.wait_for_selector("#live:text('live')", timeout=5_000)
    page.wait_for_function("document.querySelectorAll('#dag .s-COMPLETED').length === 3", timeout=5_000)


def test_cancel_from_the_page(console: Console, page: Any) -> None:
    wf = Workflow("to-cancel")
    long = wf.add(tt.slow, 30.0, id="long")
    wf.add(tt.add, long, 1, id="after")
    run_id = console.client.submit(wf)
    _open_run(page, run_id)
    page.wait_for_selector("[data-task-id='long'].s-RUNNING", timeout=10_000)
    page.click("#cancel")
    page.wait_for_selector("#action-result:text('cancel: requested')", timeout=5_000)
    end = console.client.wait(run_id, timeout=20)
    assert end.status is RunStatus.CANCELLED
    page.wait_for_selector("#run-status:text('CANCELLED')", timeout=5_000)
    # The live deltas arrived at the fold's truth: every node as client.status has it.
    want = {tid: t.status.value for tid, t in end.tasks.items()}
    page.wait_for_function(
        "want => Object.entries(want).every(([t, s]) =>"
        " document.querySelector(`[data-task-id='${t}']`).classList.contains('s-' + s))",
        arg=want,
        timeout=5_000,
    )
    assert want["long"] == "CANCELLED"


def test_signal_and_rerun_from_the_page(console: Console, page: Any) -> None:
    wf = Workflow("page-actions")
    approval = wf.wait_for("go", timeout=30, id="gate")
    wf.add(tt.echo, approval, id="echo")
    wf.add(tt.boom, "bad", id="bad")
    run_id = console.client.submit(wf)
    _open_run(page, run_id)
    page.wait_for_selector("[data-task-id='gate'].s-WAITING", timeout=10_000)
    page.fill("#signal-form [name=name]", "go")
    page.fill("#signal-form [name=payload]", '{"by": "browser"}')
    page.click("#signal-form button")
    page.wait_for_selector("#action-result:text('signal: requested')", timeout=5_000)
    end = console.client.wait(run_id, timeout=20)
    assert end.status is RunStatus.FAILED and end.results["echo"] == {"by": "browser"}
    page.wait_for_selector("#run-status:text('FAILED')", timeout=5_000)
    page.click("#rerun")
    page.wait_for_selector("#action-result:text('rerun: requested')", timeout=5_000)
    assert console.client.wait(run_id, timeout=20).tasks["bad"].attempts == 2
    # A refused action says why on the page.
    page.fill("#signal-form [name=name]", "nobody-waits-for-this")
    page.click("#signal-form button")
    page.wait_for_selector("#action-result.error", timeout=5_000)


def test_unauthenticated_requests_are_refused(console: Console, browser: Any) -> None:
    context = browser.new_context(base_url=console.url)  # no credentials
    try:
        # Headless chromium has no one to ask for the password: the navigation fails on the challenge.
        pg = context.new_page()
        with pytest.raises(Exception, match="ERR_INVALID_AUTH_CREDENTIALS"):
            pg.goto("/")
        response = context.request.get("/")
        assert response.status == 401
        assert response.headers["www-authenticate"].startswith("Basic")
        assert "<main>" not in response.text()
    finally:
        context.close()
    with httpx.Client(base_url=console.url, timeout=5) as http:
        assert http.get("/api/runs").status_code == 401
        assert http.get("/api/runs", auth=("admin", "wrong")).status_code == 401
        assert http.get("/healthz").status_code == 200  # the probe needs no credentials
        ok = http.get("/api/runs", auth=(console.credentials["username"], console.credentials["password"]))
        assert ok.status_code == 200
        # Signed in but without the CSRF token (as a forged cross-site form would be): refused.
        run_id = ok.json()["runs"][0]["run_id"]
        forged = http.post(
            f"/api/runs/{run_id}/cancel",
            json={},
            auth=(console.credentials["username"], console.credentials["password"]),
        )
        assert forged.status_code == 403


def _auth(console: Console) -> tuple[str, str]:
    return (console.credentials["username"], console.credentials["password"])


def test_json_api_sse_resume_and_actions(console: Console) -> None:
    wf = Workflow("api")
    approval = wf.wait_for("approve", timeout=30, id="approve")
    wf.add(tt.echo, approval, id="echo")
    wf.add(tt.boom, "bad", id="bad")
    run_id = console.client.submit(wf)
    with httpx.Client(base_url=console.url, auth=_auth(console), timeout=10) as http:
        page = http.get("/")  # a page sets the CSRF cookie the actions send back
        token = page.cookies["nerv_ui_csrf"]
        deadline = time.monotonic() + 10
        while http.get(f"/api/runs/{run_id}/tasks/approve").json()["status"] != "WAITING":
            assert time.monotonic() < deadline, "the wait node never started waiting"
            time.sleep(0.1)
        sent = http.post(f"/api/runs/{run_id}/signal", json={"name": "approve", "payload": {"ok": 1}},
                         headers={"x-csrf-token": token})  # fmt: skip
        assert sent.status_code == 200 and sent.json()["first"] is True
        assert console.client.wait(run_id, timeout=20).status is RunStatus.FAILED  # "bad" failed

        doc = http.get(f"/api/runs/{run_id}").json()
        assert doc["status"] == "FAILED" and doc["tasks"]["echo"]["status"] == "COMPLETED"
        assert doc["events"] == len(list(console.client.events(run_id, follow=False)))
        then = http.get(f"/api/runs/{run_id}", params={"at": 1}).json()
        assert then["status"] == "PENDING" and then["at"] == "1"
        assert http.get(f"/api/runs/{run_id}", params={"at": "nope"}).status_code == 400
        assert http.get("/api/runs/no-such-run").status_code == 404
        graph = http.get(f"/api/runs/{run_id}/graph").json()
        assert graph["tasks"]["bad"] == ["bad", "FAILED"] and graph["cursor"] == doc["cursor"]
        bad = http.get(f"/api/runs/{run_id}/tasks/bad").json()
        assert bad["error"]["message"] == "bad" and "Traceback" in bad["error"]["traceback"]
        assert http.get(f"/api/runs/{run_id}/timeline").json()["lanes"]
        assert http.get(f"/api/runs/{run_id}/tasks/no-such-task").status_code == 404
        assert set(http.get("/api/openapi.json").json()["paths"]) >= {
            "/api/runs", "/api/runs/{run_id}", "/api/runs/{run_id}/graph", "/api/runs/{run_id}/events",
        }  # fmt: skip

        # SSE: resume with Last-Event-ID from the 3rd entry: exactly the entries after it, each with
        # its entry id, until the server ends the stream (1.5 s here).
        cursors = [e.cursor for e in console.client.events(run_id, follow=False)]
        ids: list[str] = []
        with http.stream("GET", f"/api/runs/{run_id}/events", headers={"last-event-id": cursors[2]}) as r:
            assert r.headers["content-type"].startswith("text/event-stream")
            for line in r.iter_lines():
                if line.startswith("id: "):
                    ids.append(line[4:])
        assert ids == cursors[3:]

        # Rerun (the failed task again) from the API; a forged request without the token is refused.
        assert http.post(f"/api/runs/{run_id}/rerun", json={}).status_code == 403
        again = http.post(f"/api/runs/{run_id}/rerun", json={}, headers={"x-csrf-token": token})
        assert again.status_code == 200
        assert console.client.wait(run_id, timeout=20).status is RunStatus.FAILED
        assert console.client.status(run_id).tasks["bad"].attempts == 2
        refused = http.post(
            f"/api/runs/{run_id}/signal", json={"name": "nope"}, headers={"x-csrf-token": token}
        )
        assert refused.status_code == 409
