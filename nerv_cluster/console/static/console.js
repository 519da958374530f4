// The nerv console's front end: plain JavaScript, no build step, nothing loaded from elsewhere.
//
// The run page draws the DAG from /api/runs/{id}/graph (levels as columns; wide levels and maps
// folded into groups that open on a click), follows /api/runs/{id}/events (Server-Sent Events read
// from the run's log; the browser resumes a dropped stream with Last-Event-ID), and moves through
// the run's past with the slider (/api/runs/{id}/graph?at=N: the fold of the first N events).
"use strict";

const nerv = (() => {
  const MAX_COLUMNS = 40; // more levels than this are banded into groups
  const PAGE = 2000; // nodes drawn per click in an opened group
  const LOG_ROWS = 1000;

  const $ = (sel, root = document) => root.querySelector(sel);
  const el = (tag, attrs = {}, text) => {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs)) {
      if (v === undefined || v === null) continue;
      if (k === "class") e.className = v;
      else e.setAttribute(k, v);
    }
    if (text !== undefined) e.textContent = text;
    return e;
  };
  const csrf = () => $('meta[name="csrf-token"]').content;
  const cookieCsrf = () => {
    const m = document.cookie.match(/(?:^|;\s*)nerv_ui_csrf=([^;]*)/);
    return m ? decodeURIComponent(m[1]) : csrf();
  };

  async function getJSON(url) {
    const r = await fetch(url, { credentials: "same-origin", headers: { accept: "application/json" } });
    if (!r.ok) throw new Error(`${url}: ${r.status}`);
    return r.json();
  }

  async function post(url, body) {
    const r = await fetch(url, {
      method: "POST",
      credentials: "same-origin",
      headers: { "content-type": "application/json", "x-csrf-token": cookieCsrf() },
      body: JSON.stringify(body || {}),
    });
    let data = {};
    try { data = await r.json(); } catch (e) { /* an empty answer */ }
    if (!r.ok) throw new Error(data.error || `${r.status}`);
    return data;
  }

  const fmtSeconds = (s) => (s === null || s === undefined ? "" : s < 1 ? `${Math.round(s * 1000)} ms` : `${s.toFixed(1)} s`);
  const fmtTime = (t) => (t ? new Date(t * 1000).toLocaleTimeString() : "");

  // -- runs list -----------------------------------------------------------------------------------

  function runsPage() {
    const body = $("#runs-body");
    const refresh = async () => {
      const sep = location.search ? "&" : "?";
      try {
        const r = await fetch(location.pathname + location.search + sep + "fragment=1", { credentials: "same-origin" });
        if (r.ok) body.innerHTML = await r.text();
      } catch (e) { /* the next refresh tries again */ }
    };
    setInterval(refresh, 2000);
  }

  // -- run page ------------------------------------------------------------------------------------

  function runPage(root) {
    const runId = root.dataset.runId;
    const api = `/api/runs/${encodeURIComponent(runId)}`;
    const dag = $("#dag");
    const slider = $("#slider");
    const sliderLabel = $("#slider-label");
    const logBody = $("#log-body");
    const panel = $("#task-panel");
    const state = {
      statuses: new Map(),
      names: new Map(),
      nodes: new Map(),
      groupOf: new Map(),
      groups: [],
      critical: new Set(),
      sig: "",
      live: true,
      at: null,
      events: Number(root.dataset.events) || 0,
      selected: null,
      logCursors: new Set(),
      opened: new Set(), // labels of the groups opened by a click: kept open when the graph is redrawn
    };
    // What the stream delivered, for the tests: every SSE id in order, and how many came twice.
    // lags: milliseconds from each entry's logging (its id's time part, Redis's clock) to its arrival.
    const stats = (window.nervStream = { ids: [], seen: new Set(), duplicates: 0, opens: 0, errors: 0, lags: [], start: null });

    function node(tid) {
      const status = state.statuses.get(tid) || "PENDING";
      const e = el("div", { class: `node s-${status}${state.critical.has(tid) ? " critical" : ""}`, "data-task-id": tid, title: `${tid}: ${status}` }, state.names.get(tid) || tid);
      state.nodes.set(tid, e);
      return e;
    }

    function group(ids, label) {
      const g = { ids, label, counts: {}, el: el("div", { class: "group", "data-group": label, tabindex: "0" }), open: false, drawn: 0 };
      for (const tid of ids) {
        const s = state.statuses.get(tid) || "PENDING";
        g.counts[s] = (g.counts[s] || 0) + 1;
        state.groupOf.set(tid, g);
      }
      g.el.addEventListener("click", (ev) => {
        if (ev.target.closest("[data-task-id]") || ev.target.closest(".more")) return;
        if (!g.open) openGroup(g);
      });
      state.groups.push(g);
      if (state.opened.has(label)) openGroup(g);
      else drawGroup(g);
      return g.el;
    }

    function drawGroup(g) {
      if (g.open) return;
      g.el.textContent = "";
      g.el.append(el("div", { class: "group-label" }, `${g.label} · ${g.ids.length} tasks ▸`));
      const bar = el("div", { class: "group-bar" });
      for (const [s, n] of Object.entries(g.counts)) {
        if (!n) continue;
        bar.append(el("span", { class: `s-${s}`, style: `flex-grow:${n}`, title: `${s}: ${n}` }));
      }
      g.el.append(bar);
    }

    function openGroup(g) {
      g.open = true;
      state.opened.add(g.label);
      g.el.classList.add("open");
      g.el.textContent = "";
      g.el.append(el("div", { class: "group-label" }, `${g.label} · ${g.ids.length} tasks`));
      drawMore(g);
    }

    function drawMore(g) {
      const old = $(".more", g.el);
      if (old) old.remove();
      const frag = document.createDocumentFragment();
      const upto = Math.min(g.ids.length, g.drawn + PAGE);
      for (let i = g.drawn; i < upto; i++) frag.append(node(g.ids[i]));
      g.drawn = upto;
      g.el.append(frag);
      if (g.drawn < g.ids.length) {
        const more = el("button", { class: "more", type: "button" }, `${g.ids.length - g.drawn} more…`);
        more.addEventListener("click", () => drawMore(g));
        g.el.append(more);
      }
    }

    const signature = (g) => JSON.stringify([g.levels.map((l) => l.tasks.length), Object.entries(g.maps).map(([k, m]) => [k, m.tasks.length])]);

    function renderGraph(g) {
      state.sig = signature(g);
      state.statuses = new Map();
      state.names = new Map();
      for (const [tid, [name, status]] of Object.entries(g.tasks)) {
        state.statuses.set(tid, status);
        if (name !== tid) state.names.set(tid, name);
      }
      state.critical = new Set(g.critical);
      state.nodes = new Map();
      state.groupOf = new Map();
      state.groups = [];
      dag.textContent = "";
      const mapsAt = new Map(); // level -> maps whose node is on it
      for (const [mapId, m] of Object.entries(g.maps)) {
        const lv = g.levels.findIndex((l) => l.tasks.includes(mapId));
        if (!mapsAt.has(lv)) mapsAt.set(lv, []);
        mapsAt.get(lv).push([mapId, m]);
      }
      const band = Math.ceil(g.levels.length / MAX_COLUMNS);
      for (let start = 0; start < g.levels.length; start += band) {
        const levels = g.levels.slice(start, start + band);
        const col = el("div", { class: "level", "data-level": String(start) });
        if (band > 1) {
          const ids = [];
          for (let k = start; k < start + levels.length; k++) {
            ids.push(...g.levels[k].tasks);
            for (const [, m] of mapsAt.get(k) || []) ids.push(...m.tasks);
          }
          const last = start + levels.length - 1;
          col.append(group(ids, last > start ? `levels ${start}–${last}` : `level ${start}`));
          dag.append(col);
          continue;
        }
        const lv = levels[0];
        col.append(el("div", { class: "level-label" }, `level ${lv.level}`));
        if (lv.group) col.append(group(lv.tasks, `level ${lv.level}`));
        else for (const tid of lv.tasks) col.append(node(tid));
        dag.append(col);
        for (const [mapId, m] of mapsAt.get(start) || []) {
          const mcol = el("div", { class: "level map", "data-map": mapId });
          mcol.append(el("div", { class: "level-label" }, `map ${mapId}`));
          if (m.group) mcol.append(group(m.tasks, `map ${mapId}`));
          else for (const tid of m.tasks) mcol.append(node(tid));
          dag.append(mcol);
        }
      }
      drawEdges(g.deps);
    }

    function drawEdges(deps) {
      const old = $("svg.edges", dag);
      if (old) old.remove();
      const pairs = Object.entries(deps || {});
      if (!pairs.length) return;
      const box = dag.getBoundingClientRect();
      const svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
      svg.setAttribute("class", "edges");
      svg.setAttribute("width", dag.scrollWidth);
      svg.setAttribute("height", dag.scrollHeight);
      for (const [tid, ds] of pairs) {
        const to = state.nodes.get(tid);
        if (!to) continue;
        const b = to.getBoundingClientRect();
        for (const d of ds) {
          const from = state.nodes.get(d);
          if (!from) continue;
          const a = from.getBoundingClientRect();
          const x1 = a.right - box.left + dag.scrollLeft, y1 = a.top + a.height / 2 - box.top + dag.scrollTop;
          const x2 = b.left - box.left + dag.scrollLeft, y2 = b.top + b.height / 2 - box.top + dag.scrollTop;
          const path = document.createElementNS("http://www.w3.org/2000/svg", "path");
          const mx = (x1 + x2) / 2;
          path.setAttribute("d", `M${x1},${y1} C${mx},${y1} ${mx},${y2} ${x2},${y2}`);
          svg.append(path);
        }
      }
      dag.prepend(svg);
    }

    const dirtyGroups = new Set();
    function setStatus(tid, status) {
      const old = state.statuses.get(tid);
      if (old === status) return;
      state.statuses.set(tid, status);
      const n = state.nodes.get(tid);
      if (n) {
        n.className = `node s-${status}${state.critical.has(tid) ? " critical" : ""}`;
        n.title = `${tid}: ${status}`;
      }
      const g = state.groupOf.get(tid);
      if (g) {
        if (old) g.counts[old] = (g.counts[old] || 1) - 1;
        g.counts[status] = (g.counts[status] || 0) + 1;
        dirtyGroups.add(g);
        flushSoon();
      }
    }

    function header(msg) {
      const status = $("#run-status");
      status.textContent = msg.status;
      status.className = `badge s-${msg.status}`;
      const counts = $("#counts");
      counts.textContent = "";
      for (const [s, n] of Object.entries(msg.counts || {})) {
        const c = el("span", { class: `count s-${s}`, "data-status": s }, `${s} `);
        c.append(el("b", {}, String(n)));
        counts.append(c);
      }
      const total = msg.total || 0;
      $("#progress").style.width = `${total ? (100 * msg.finished) / total : 100}%`;
      $("#progress-text").textContent = `${msg.finished}/${total}`;
    }

    // Log rows and the header are drawn at most every FLUSH_MS, in one batch: a stream of thousands
    // of events a second then costs a few DOM updates a second, not one per event.
    const FLUSH_MS = 50;
    const pendingRows = [];
    let pendingHeader = null;
    let flushTimer = 0;
    function flushSoon() {
      if (!flushTimer) flushTimer = setTimeout(flush, FLUSH_MS);
    }
    function flush() {
      flushTimer = 0;
      if (pendingHeader) { header(pendingHeader); pendingHeader = null; }
      for (const d of dirtyGroups) drawGroup(d);
      dirtyGroups.clear();
      sliderText();
      if (!pendingRows.length) return;
      const wrap = logBody.parentElement.parentElement;
      const atBottom = wrap.scrollTop + wrap.clientHeight >= wrap.scrollHeight - 4;
      const frag = document.createDocumentFragment();
      for (const e of pendingRows.splice(0).slice(-LOG_ROWS)) {
        const tr = el("tr", { "data-cursor": e.cursor, class: `t-${e.type}` });
        tr.append(el("td", { class: "mono" }, e.cursor), el("td", {}, e.type), el("td", { class: "mono" }, e.task || ""), el("td", {}, e.attempt ?? ""), el("td", { class: "mono data" }, e.data));
        if (e.task) tr.dataset.task = e.task;
        frag.append(tr);
      }
      logBody.append(frag);
      while (logBody.rows.length > LOG_ROWS) {
        state.logCursors.delete(logBody.rows[0].dataset.cursor);
        logBody.deleteRow(0);
      }
      if (atBottom) wrap.scrollTop = wrap.scrollHeight;
    }

    function logRow(e) {
      if (!e.cursor || state.logCursors.has(e.cursor)) return;
      state.logCursors.add(e.cursor);
      pendingRows.push(e);
      flushSoon();
    }

    function sliderText() {
      if (state.live) sliderLabel.textContent = `event ${state.events} of ${state.events} (now)`;
      else {
        const e = state.atEvent;
        const what = e ? `: ${e.type}${e.task ? " " + e.task : ""}` : "";
        sliderLabel.textContent = `state after event ${state.at} of ${state.events}${what}`;
      }
      $("#live").textContent = state.live ? "live" : "time travel";
      $("#live").className = state.live ? "live" : "live paused";
    }

    async function showGraph(at) {
      const g = await getJSON(at ? `${api}/graph?at=${at}` : `${api}/graph`);
      if (signature(g) !== state.sig) renderGraph(g);
      else {
        for (const [tid, [, status]] of Object.entries(g.tasks)) setStatus(tid, status);
        state.critical = new Set(g.critical);
      }
      header(g);
      dag.dataset.at = at || "";
      loadTimeline(at);
      if (state.selected) showTask(state.selected);
      return g;
    }

    let reloadTimer = 0;
    function reloadSoon() {
      if (reloadTimer) return;
      reloadTimer = setTimeout(() => { reloadTimer = 0; if (state.live) showGraph(null); }, 250);
    }

    let timelineTimer = 0;
    function timelineSoon() {
      if (timelineTimer) return;
      timelineTimer = setTimeout(() => { timelineTimer = 0; if (state.live) loadTimeline(null); }, 1500);
    }

    function onMessage(ev) {
      if (stats.seen.has(ev.lastEventId)) stats.duplicates++;
      stats.seen.add(ev.lastEventId);
      stats.ids.push(ev.lastEventId);
      stats.lags.push(Date.now() - Number(ev.lastEventId.split("-")[0]));
      const msg = JSON.parse(ev.data);
      state.events++;
      slider.max = String(state.events);
      if (state.live) {
        slider.value = String(state.events);
        if (msg.reload) reloadSoon();
        for (const [tid, status] of Object.entries(msg.changes)) setStatus(tid, status);
        pendingHeader = msg;
        timelineSoon();
        if (state.selected && msg.event.task === state.selected) showTask(state.selected);
      }
      logRow(msg.event);
      flushSoon();
    }

    function follow(after) {
      stats.start = after;
      const es = new EventSource(`${api}/events?after=${encodeURIComponent(after)}`);
      es.onopen = () => { stats.opens++; };
      es.onerror = () => { stats.errors++; }; // the browser reconnects by itself, with Last-Event-ID
      es.onmessage = onMessage;
      window.nervEventSource = es;
    }

    // -- the task panel ------------------------------------------------------------------------------

    function field(dl, name, value, cls) {
      if (value === null || value === undefined || value === "" || (Array.isArray(value) && !value.length)) return;
      dl.append(el("dt", {}, name));
      const dd = el("dd", { class: cls }, Array.isArray(value) ? value.join(", ") : String(value));
      dl.append(dd);
    }

    async function showTask(tid) {
      state.selected = tid;
      const q = state.live ? "" : `?at=${state.at}`;
      let t;
      try { t = await getJSON(`${api}/tasks/${encodeURIComponent(tid)}${q}`); } catch (e) { return; }
      const body = $("#task-body");
      body.textContent = "";
      body.dataset.taskId = tid;
      const h = el("h3", {}, t.name);
      h.append(" ", el("span", { class: `badge s-${t.status}`, id: "task-status" }, t.status));
      body.append(h);
      const dl = el("dl");
      field(dl, "task id", t.task_id, "mono");
      field(dl, "function", t.fn, "mono");
      field(dl, "queue", t.queue);
      field(dl, "level", t.level);
      field(dl, "arguments", t.args.length ? t.args.join(", ") : null, "mono");
      field(dl, "keyword arguments", Object.keys(t.kwargs).length ? Object.entries(t.kwargs).map(([k, v]) => `${k}=${v}`).join(", ") : null, "mono");
      field(dl, "result", t.result, "mono result");
      field(dl, "attempts", t.attempts);
      field(dl, "worker", t.worker, "mono");
      field(dl, "dispatched", fmtTime(t.dispatched_at));
      field(dl, "started", fmtTime(t.started_at));
      field(dl, "finished", fmtTime(t.finished_at));
      field(dl, "ran for", fmtSeconds(t.ran_for));
      field(dl, t.status === "SKIPPED" ? "why skipped" : "reason", t.reason, "reason");
      field(dl, "trigger rule", t.trigger);
      field(dl, "depends on", t.dependencies, "mono");
      field(dl, "dependents", t.dependents, "mono");
      field(dl, "cached from", t.cached_from, "mono");
      body.append(dl);
      if (t.child) body.append(el("p", {}, "child run: "), el("a", { href: `/runs/${encodeURIComponent(t.child)}` }, t.child));
      if (t.error) {
        const box = el("div", { class: "error-box", id: "task-error" });
        box.append(el("p", { class: "error" }, `${t.error.type}: ${t.error.message}`));
        if (t.error.traceback) box.append(el("pre", { class: "traceback" }, t.error.traceback));
        body.append(box);
      }
      panel.hidden = false;
      for (const n of dag.querySelectorAll(".node.selected")) n.classList.remove("selected");
      const n = state.nodes.get(tid);
      if (n) n.classList.add("selected");
    }

    dag.addEventListener("click", (ev) => {
      const n = ev.target.closest("[data-task-id]");
      if (n) showTask(n.dataset.taskId);
    });
    $("#task-close").addEventListener("click", () => { panel.hidden = true; state.selected = null; });

    // -- the timeline --------------------------------------------------------------------------------

    async function loadTimeline(at) {
      let t;
      try { t = await getJSON(at ? `${api}/timeline?at=${at}` : `${api}/timeline`); } catch (e) { return; }
      const box = $("#timeline");
      box.textContent = "";
      if (!t.lanes.length) { box.append(el("p", { class: "empty" }, "nothing has started yet")); return; }
      const crit = new Set(t.critical);
      const laneH = 18, rowH = 8, labelW = 190, W = 1000, span = t.span || 1;
      const svgNS = "http://www.w3.org/2000/svg";
      const svg = document.createElementNS(svgNS, "svg");
      // A lane per worker; a worker running several tasks at once (threads) gets a thin row each.
      const heights = t.lanes.map((lane) => (lane.rows > 1 ? Math.max(laneH, lane.rows * rowH + 4) : laneH));
      const total = heights.reduce((a, b) => a + b, 0);
      svg.setAttribute("viewBox", `0 0 ${labelW + W} ${total + 16}`);
      svg.setAttribute("class", "gantt");
      let y = 0;
      t.lanes.forEach((lane, i) => {
        const h = heights[i];
        const rh = lane.rows > 1 ? rowH : laneH;
        const label = document.createElementNS(svgNS, "text");
        label.setAttribute("x", 2); label.setAttribute("y", y + 13);
        label.textContent = lane.worker.length > 30 ? "…" + lane.worker.slice(-29) : lane.worker;
        svg.append(label);
        const line = document.createElementNS(svgNS, "line");
        line.setAttribute("x1", labelW); line.setAttribute("x2", labelW + W);
        line.setAttribute("y1", y + h); line.setAttribute("y2", y + h);
        line.setAttribute("class", "lane-line");
        svg.append(line);
        for (const [tid, start, end, status, row] of lane.bars) {
          const r = document.createElementNS(svgNS, "rect");
          r.setAttribute("x", labelW + (start / span) * W);
          r.setAttribute("y", y + 2 + (lane.rows > 1 ? row * rowH : 0));
          r.setAttribute("width", Math.max(1, ((end - start) / span) * W));
          r.setAttribute("height", rh - (lane.rows > 1 ? 1 : 4));
          r.setAttribute("class", `s-${status}${crit.has(tid) ? " critical" : ""}`);
          r.setAttribute("data-task-id", tid);
          const tip = document.createElementNS(svgNS, "title");
          tip.textContent = `${tid} ${status} ${fmtSeconds(end - start)}`;
          r.append(tip);
          svg.append(r);
        }
        y += h;
      });
      const axis = document.createElementNS(svgNS, "text");
      axis.setAttribute("x", labelW + W - 2); axis.setAttribute("y", total + 13);
      axis.setAttribute("text-anchor", "end");
      axis.textContent = `${fmtSeconds(span)}${t.dropped ? ` (${t.dropped} shortest bars not drawn)` : ""}`;
      svg.append(axis);
      svg.addEventListener("click", (ev) => { const r = ev.target.closest("[data-task-id]"); if (r) showTask(r.dataset.taskId); });
      box.append(svg);
    }

    // -- time travel ---------------------------------------------------------------------------------

    function markLogRow(cursor) {
      for (const r of logBody.querySelectorAll("tr.at")) r.classList.remove("at");
      const row = cursor && logBody.querySelector(`tr[data-cursor="${cursor}"]`);
      if (row) row.classList.add("at");
    }

    // To a point of the log: a count of events (the slider) or a cursor (a click on the event log).
    async function travel(at) {
      state.live = false;
      state.at = at;
      state.atEvent = null;
      sliderText();
      const g = await showGraph(at);
      state.at = g.position;
      state.atEvent = g.event;
      slider.value = String(g.position);
      markLogRow(g.event && g.event.cursor);
      sliderText();
    }

    async function goLive() {
      state.live = true;
      state.at = null;
      state.atEvent = null;
      sliderText();
      markLogRow(null);
      await showGraph(null);
    }

    let slideTimer = 0;
    slider.addEventListener("input", () => {
      clearTimeout(slideTimer);
      slideTimer = setTimeout(() => {
        const v = Number(slider.value);
        if (v >= state.events) goLive();
        else travel(v);
      }, 120);
    });
    logBody.addEventListener("click", (ev) => {
      const row = ev.target.closest("tr[data-cursor]");
      if (row) travel(row.dataset.cursor);
    });

    // -- actions -------------------------------------------------------------------------------------

    const result = $("#action-result");
    async function act(name, body) {
      result.textContent = `${name}…`;
      result.className = "action-result";
      try {
        await post(`${api}/${name}`, body);
        result.textContent = `${name}: requested`;
      } catch (e) {
        result.textContent = `${name}: ${e.message}`;
        result.className = "action-result error";
      }
    }
    $("#cancel").addEventListener("click", () => act("cancel", {}));
    $("#rerun").addEventListener("click", () => act("rerun", {}));
    $("#signal-form").addEventListener("submit", (ev) => {
      ev.preventDefault();
      const f = ev.target;
      let payload = null;
      if (f.payload.value.trim()) {
        try { payload = JSON.parse(f.payload.value); } catch (e) { result.textContent = "signal: the payload is no JSON"; return; }
      }
      act("signal", { name: f.name.value.trim(), payload });
    });

    // -- start -----------------------------------------------------------------------------------------

    (async () => {
      const g = await getJSON(`${api}/graph`);
      renderGraph(g);
      header(g);
      state.events = g.events;
      slider.max = String(Math.max(1, g.events));
      slider.value = slider.max;
      sliderText();
      follow(g.cursor);
      loadTimeline(null);
      try {
        const log = await getJSON(`${api}/log?limit=300`);
        for (const e of log.events) if (!stats.seen.has(e.cursor)) logRow(e);
      } catch (e) { /* the live part still comes */ }
      document.body.dataset.ready = "1";
    })();
  }

  return { runsPage, runPage, post, getJSON };
})();
window.nerv = nerv;

// Start whichever page this is (no inline script: the pages' Content-Security-Policy forbids them).
(() => {
  const run = document.getElementById("run");
  if (run) nerv.runPage(run);
  else if (document.getElementById("runs-body")) nerv.runsPage();
})();
