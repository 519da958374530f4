"""The console's pure parts (nerv_cluster/console/views.py, auth.py): projections of folded state, the
runs list's nesting and filters, the critical path, live deltas, credentials and CSRF, no Redis."""

from __future__ import annotations

import base64
from typing import Any

import pytest

from nerv_cluster import constants
from nerv_cluster.console import views
from nerv_cluster.console.auth import AuthConfig, authenticated, check_bind, csrf_ok, is_loopback
from nerv_cluster.errors import ConfigurationError
from nerv_cluster.model import EventType
from nerv_cluster.state import RunState, apply_to_run, fold_run
from tests.unit.helpers import completes, diamond, ev, fails, submitted, td, wdef


def _run(*events: Any) -> RunState:
    run = fold_run(None, list(events))
    assert run is not None
    return run


def _diamond_done() -> RunState:
    return _run(
        submitted(diamond()),
        ev(EventType.WORKFLOW_STARTED),
        *completes("a", 1, worker="w1"),
        *completes("c", 3, worker="w2"),
        *completes("b", 2, worker="w1"),
        *completes("d", 4, worker="w2"),
        ev(EventType.WORKFLOW_COMPLETED),
    )


def test_graph_follows_the_planner_levels_and_groups_wide_levels() -> None:
    g = views.graph(_diamond_done())
    assert [lv["tasks"] for lv in g["levels"]] == [["a"], ["b", "c"], ["d"]]
    assert not any(lv["group"] for lv in g["levels"])
    assert g["tasks"]["d"] == ["d", "COMPLETED"]
    assert g["deps"]["d"] == ["b", "c"]

    wide = wdef(
        td("root"), *[td(f"t{i}", "root") for i in range(100)], td("sink", *[f"t{i}" for i in range(100)])
    )
    g = views.graph(_run(submitted(wide)), group_limit=60)
    assert [lv["group"] for lv in g["levels"]] == [False, True, False]
    assert len(g["levels"][1]["tasks"]) == 100
    assert len(g["tasks"]) == 102


def test_critical_path_walks_back_from_the_last_end_through_the_latest_dependency() -> None:
    # b ended after c, so d waited for b: the path is a, b, d.
    assert views.critical_path(_diamond_done()) == ["a", "b", "d"]
    # Before anything ends: the planner's longest chain.
    assert views.critical_path(_run(submitted(diamond()))) == ["a", "b", "d"]


def test_timeline_has_a_lane_per_worker_and_bounds_its_bars() -> None:
    t = views.timeline(_diamond_done())
    assert [lane["worker"] for lane in t["lanes"]] == ["w1", "w2"]
    assert [bar[0] for bar in t["lanes"][0]["bars"]] == ["a", "b"]
    for lane in t["lanes"]:
        for _, start, end, status, _row in lane["bars"]:
            assert 0 <= start <= end <= t["span"] and status == "COMPLETED"
    assert t["critical"] == ["a", "b", "d"]
    small = views.timeline(_diamond_done(), max_bars=2)
    assert sum(len(lane["bars"]) for lane in small["lanes"]) == 2 and small["dropped"] == 2


def test_task_detail_shows_the_error_the_skip_reason_and_shortens_values() -> None:
    run = _run(
        submitted(wdef(td("a", args=("x" * 1000,)), td("b", "a"))),
        ev(EventType.WORKFLOW_STARTED),
        *fails("a", "kaput"),
        ev(EventType.TASK_SKIPPED, "b", reason="dependency a failed"),
    )
    a = views.task_detail(run, "a")
    assert a["status"] == "FAILED" and a["error"]["message"] == "kaput" and a["attempts"] == 1
    assert a["worker"] == "w1" and a["dependents"] == ["b"]
    assert len(a["args"][0]) < 500 and "more characters" in a["args"][0]
    b = views.task_detail(run, "b")
    assert b["status"] == "SKIPPED" and b["reason"] == "dependency a failed"


def test_changes_name_the_tasks_an_event_moved() -> None:
    run = _run(submitted(diamond()), ev(EventType.WORKFLOW_STARTED))
    for e in completes("a", 1)[:2]:
        run = apply_to_run(run, e) or run
    done = completes("a", 1)[2]
    after = apply_to_run(run, done)
    assert after is not None
    # a completed; b and c became READY.
    assert views.changes(run, after, done) == {"a": "COMPLETED", "b": "READY", "c": "READY"}
    msg = views.sse_message(done, run, after)
    assert msg["reload"] is False and msg["counts"]["COMPLETED"] == 1 and msg["total"] == 4
    assert views.sse_message(submitted(diamond()), None, after)["reload"] is True


def test_runs_list_nests_children_under_parents_and_filters() -> None:
    rows = [
        {"run_id": "child", "name": "c", "status": "COMPLETED", "parent": {"run_id": "top"}},
        {"run_id": "other", "name": "etl-nightly", "status": "FAILED", "parent": None},
        {"run_id": "top", "name": "parent", "status": "RUNNING", "parent": None},
        {"run_id": "orphan", "name": "o", "status": "COMPLETED", "parent": {"run_id": "gone"}},
    ]
    nested = views.nest_runs(rows)
    assert [(r["run_id"], r["indent"]) for r in nested] == [
        ("other", 0),
        ("top", 0),
        ("child", 1),
        ("orphan", 0),
    ]
    assert [r["run_id"] for r in views.filter_runs(rows, status="failed")] == ["other"]
    assert [r["run_id"] for r in views.filter_runs(rows, name="ETL")] == ["other"]
    assert [r["run_id"] for r in views.filter_runs(rows, name="orph")] == ["orphan"]


def _scope(**headers: str) -> dict[str, Any]:
    return {"headers": [(k.replace("_", "-").encode(), v.encode()) for k, v in headers.items()]}


def test_credentials_from_the_environment_and_how_requests_prove_them() -> None:
    assert not AuthConfig.from_env({}).enabled
    with pytest.raises(ConfigurationError):
        AuthConfig.from_env({constants.UI_USER_ENV: "admin"})
    auth = AuthConfig.from_env({constants.UI_TOKEN_ENV: "s3cret", constants.UI_USER_ENV: "admin",
                                constants.UI_PASSWORD_ENV: "pw"})  # fmt: skip
    assert authenticated(_scope(), auth) is None
    assert authenticated(_scope(authorization="Bearer s3cret"), auth) == "bearer"
    assert authenticated(_scope(authorization="Bearer wrong"), auth) is None
    basic = base64.b64encode(b"admin:pw").decode()
    assert authenticated(_scope(authorization=f"Basic {basic}"), auth) == "basic"
    assert authenticated(_scope(authorization="Basic !!notbase64"), auth) is None
    assert authenticated(_scope(cookie=f"{constants.UI_TOKEN_COOKIE}=s3cret"), auth) == "cookie"
    assert authenticated(_scope(), AuthConfig()) == "open"


def test_a_non_loopback_address_needs_credentials() -> None:
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("example.org")
    check_bind("127.0.0.1", AuthConfig())
    with pytest.raises(ConfigurationError, match="NERV_UI_TOKEN"):
        check_bind("0.0.0.0", AuthConfig())
    check_bind("0.0.0.0", AuthConfig(token="t"))


def test_csrf_double_submit_and_origin() -> None:
    cookie = f"{constants.UI_CSRF_COOKIE}=tok123"
    assert csrf_ok(_scope(cookie=cookie, x_csrf_token="tok123", host="h:1"))
    assert csrf_ok(_scope(cookie=cookie, host="h:1"), form_token="tok123")
    assert not csrf_ok(_scope(cookie=cookie, host="h:1"))  # no token sent
    assert not csrf_ok(_scope(x_csrf_token="tok123", host="h:1"))  # no cookie: another site's guess
    assert not csrf_ok(_scope(cookie=cookie, x_csrf_token="other", host="h:1"))
    assert not csrf_ok(_scope(cookie=cookie, x_csrf_token="tok123", host="h:1", origin="http://evil.example"))
    assert csrf_ok(_scope(cookie=cookie, x_csrf_token="tok123", host="h:1", origin="http://h:1"))


def test_overlapping_tasks_of_one_worker_get_rows_of_their_own() -> None:
    # b and c run at once on one thread-pool worker: two rows in its lane; d after them reuses row 0.
    run = _run(
        submitted(diamond()),
        ev(EventType.WORKFLOW_STARTED),
        *completes("a", 1, worker="pool"),
        ev(EventType.TASK_DISPATCHED, "b", 1, queue="io"),
        ev(EventType.TASK_DISPATCHED, "c", 1, queue="io"),
        ev(EventType.TASK_STARTED, "b", 1, worker="pool"),
        ev(EventType.TASK_STARTED, "c", 1, worker="pool"),
        ev(EventType.TASK_COMPLETED, "b", 1, result=2, worker="pool"),
        ev(EventType.TASK_COMPLETED, "c", 1, result=3, worker="pool"),
        *completes("d", 4, worker="pool"),
    )
    (lane,) = views.timeline(run)["lanes"]
    rows = {bar[0]: bar[4] for bar in lane["bars"]}
    assert lane["rows"] == 2 and rows["b"] != rows["c"] and rows["a"] == rows["d"] == 0


def test_references_to_upstream_results_read_as_task_ids() -> None:
    ref = {constants.REF_KEY: "clean-0"}
    assert views.shorten(views.readable([1, ref, {"k": ref}, "<x>"])) == '[1,<clean-0>,{"k":<clean-0>},"<x>"]'
    run = _run(submitted(wdef(td("a"), td("b", "a", args=({constants.REF_KEY: "a"}, "a")))))
    assert views.task_detail(run, "b")["args"] == ["<a>", '"a"']


def test_a_maps_elements_are_drawn_under_it_and_grouped_when_wide() -> None:
    from tests.unit.test_mapping import crawl, expanded_run, fold_in

    before = _run(submitted(crawl()))
    assert views.graph(before)["maps"] == {}
    run, decisions = expanded_run(list(range(100)))
    run = fold_in(run, list(decisions.events))  # MAP_EXPANDED: the elements exist from here on
    g = views.graph(run, group_limit=60)
    assert [lv["tasks"] for lv in g["levels"]] == [["src"], ["m"], ["total"]]
    assert g["maps"]["m"]["group"] is True and len(g["maps"]["m"]["tasks"]) == 100
    assert g["maps"]["m"]["tasks"][0] == "m[0]" and g["tasks"]["m[0]"][1] == "READY"
    # An element's end moves it and its map node in the live delta, nothing else is scanned.
    e0 = completes("m[0]", 1)
    after = fold_in(run, e0)
    assert views.changes(fold_in(run, e0[:2]), after, e0[2]) == {"m[0]": "COMPLETED"}
