// wsgiscope's live page: polls the agent's JSON API v1 every second and draws the X-View
// scatter, the Active Service panel and the route table. Plain ES2020, no libraries.
// Every string from the API is rendered through textContent: routes, peers and operations
// come from clients.
"use strict";

const WINDOW = 300; // seconds of requests the scatter keeps
const MAX_DOTS = 20000;
const POLL_MS = 1000;
const SHOWN_ROWS = 1000; // selection rows put in the DOM (all are counted)

const state = {
  records: [], // oldest first
  cursor: 0,
  missed: 0, // dropped by the agent's ring between two reads of this page
  goneBefore: 0, // dropped before the page's first read
  clockOffset: 0, // agent clock − browser clock, when they differ by more than 2 s
  answered: { requests: false, active: false, routes: false },
  drawn: [], // [record, x, y] of the last frame, in CSS pixels
  drag: null, // {x0, y0, x1, y1} while box-selecting
  selected: [],
  chosenSeq: null,
  routes: [],
  sort: { key: "total_time", desc: true },
};

const $ = (id) => document.getElementById(id);

// ---- formatting -------------------------------------------------------------------------

function fmtDur(s) {
  if (s === null || s === undefined || !Number.isFinite(s)) return "–";
  if (s === 0) return "0";
  if (s < 1e-3) return (s * 1e6).toFixed(0) + "µs";
  if (s < 1) return (s * 1e3).toFixed(s < 0.01 ? 2 : 1) + "ms";
  return s.toFixed(s < 10 ? 2 : 1) + "s";
}

function fmtBytes(n) {
  if (n < 1024) return n + " B";
  if (n < 1024 * 1024) return (n / 1024).toFixed(1) + " KiB";
  return (n / 1024 / 1024).toFixed(1) + " MiB";
}

function fmtClock(t, millis) {
  const d = new Date(t * 1000);
  const p = (n, w = 2) => String(n).padStart(w, "0");
  const hms = `${p(d.getHours())}:${p(d.getMinutes())}:${p(d.getSeconds())}`;
  return millis ? `${hms}.${p(d.getMilliseconds(), 3)}` : hms;
}

const pct = (x) => (x * 100).toFixed(x < 0.1 ? 1 : 0) + "%";

function decadeLabel(e) {
  const units = [[0, "s"], [-3, "ms"], [-6, "µs"]];
  for (const [base, unit] of units) {
    if (e >= base) return 10 ** (e - base) + unit;
  }
  return "1e" + e + "s";
}

// Colour class of a request: its status when it has one, else its outcome.
function outcomeClass(r) {
  if (r.outcome === "aborted" || r.outcome === "error" || (r.status !== null && r.status >= 500)) return "error";
  if (r.status !== null && r.status >= 400) return "client";
  if (r.status !== null && r.status >= 200) return "ok";
  return "other";
}

const cssVar = (name) => getComputedStyle(document.documentElement).getPropertyValue(name).trim();

// Small DOM helper: el("td", {className: "x"}, "text") — text always goes in as textContent.
function el(tag, props, ...children) {
  const e = document.createElement(tag);
  Object.assign(e, props || {});
  for (const c of children) {
    if (c === null || c === undefined) continue;
    e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return e;
}

const nowAgent = () => Date.now() / 1000 + state.clockOffset;

// ---- fetching ---------------------------------------------------------------------------

// Failed fetches are expected (the agent stopped): they set the banner, never throw.
// An agent that accepts but never answers counts as unreachable too: a 3 s timeout.
async function getJson(path) {
  const abort = new AbortController();
  const timer = setTimeout(() => abort.abort(), 3000);
  try {
    const r = await fetch(path, { cache: "no-store", signal: abort.signal });
    if (!r.ok) return null;
    return await r.json();
  } catch (_) {
    return null;
  } finally {
    clearTimeout(timer);
  }
}

async function pollRequests() {
  // Catch up in pages of 10,000 when the agent holds more than one page.
  for (let i = 0; i < 5; i++) {
    const since = state.cursor;
    const page = await getJson(`api/requests?since=${since}&limit=10000`);
    if (!page) return false;
    if (page.cursor < since) {
      // The agent restarted: its sequence began again.
      state.cursor = 0;
      continue;
    }
    if (since === 0) state.goneBefore = page.missed;
    else state.missed += page.missed;
    state.cursor = page.cursor;
    for (const r of page.requests) state.records.push(r);
    if (!page.more) break;
  }
  prune();
  document.body.dataset.cursor = String(state.cursor);
  const m = $("missed");
  m.hidden = state.missed === 0 && state.goneBefore === 0;
  m.textContent = (state.missed ? `${state.missed} requests ended but were dropped by the agent's ring before ` +
    `this page could read them: the X-View lacks them (raise --ui-requests). ` : "") +
    (state.goneBefore ? `${state.goneBefore} older requests had left the agent's ring before this page opened.` : "");
  return true;
}

function prune() {
  const oldest = nowAgent() - WINDOW;
  let cut = 0;
  while (cut < state.records.length && state.records[cut].end < oldest) cut++;
  cut = Math.max(cut, state.records.length - MAX_DOTS);
  if (cut > 0) state.records.splice(0, cut);
}

async function pollActive() {
  const a = await getJson("api/active");
  if (!a) return false;
  const skew = a.at - Date.now() / 1000;
  state.clockOffset = Math.abs(skew) > 2 ? skew : 0;
  renderActive(a.workers);
  return true;
}

async function pollRoutes() {
  const r = await getJson("api/routes");
  if (!r) return false;
  state.routes = r.routes;
  $("routes-window").textContent = `— last ${Math.round(r.window)} s`;
  renderRoutes();
  return true;
}

// The next poll is scheduled whatever happens in this one: a rendering bug shows as a page
// error, and the page still goes on.
async function tick() {
  try {
    await poll();
  } finally {
    setTimeout(tick, POLL_MS);
  }
}

async function poll() {
  const [req, act, rou] = await Promise.all([pollRequests(), pollActive(), pollRoutes()]);
  state.answered.requests = state.answered.requests || req;
  state.answered.active = state.answered.active || act;
  state.answered.routes = state.answered.routes || rou;
  const up = req && act && rou;
  $("unreachable").hidden = up;
  $("status").textContent = up ? `live · updated ${fmtClock(Date.now() / 1000)}` : `no answer since ${$("status").dataset.last || "start"}`;
  if (up) $("status").dataset.last = fmtClock(Date.now() / 1000);
  drawScatter();
  const a = state.answered;
  if (a.requests && a.active && a.routes) document.body.dataset.ready = "1";
}

// ---- X-View scatter ---------------------------------------------------------------------

const PAD = { left: 56, right: 14, top: 10, bottom: 24 };

// The plot's geometry for the current data: x is end time, y is log10(duration).
function geometry(canvas) {
  const w = canvas.clientWidth, h = canvas.clientHeight;
  const now = Math.max(nowAgent(), ...state.records.slice(-1).map((r) => r.end));
  let lo = -3, hi = 0; // at least 1 ms – 1 s, widened by decades to fit the data
  for (const r of state.records) {
    const e = Math.log10(Math.max(r.duration, 1e-6));
    if (e < lo) lo = Math.floor(e);
    if (e > hi) hi = Math.ceil(e);
  }
  const pw = w - PAD.left - PAD.right, ph = h - PAD.top - PAD.bottom;
  return {
    w, h, now, lo, hi,
    x: (t) => PAD.left + Math.min(1, Math.max(0, (t - (now - WINDOW)) / WINDOW)) * pw,
    y: (d) => PAD.top + (1 - (Math.log10(Math.max(d, 1e-6)) - lo) / (hi - lo)) * ph,
    right: PAD.left + pw,
    bottom: PAD.top + ph,
  };
}

function drawScatter() {
  const canvas = $("xview");
  const dpr = window.devicePixelRatio || 1;
  const g = geometry(canvas);
  if (canvas.width !== Math.round(g.w * dpr) || canvas.height !== Math.round(g.h * dpr)) {
    canvas.width = Math.round(g.w * dpr);
    canvas.height = Math.round(g.h * dpr);
  }
  const ctx = canvas.getContext("2d");
  ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
  ctx.clearRect(0, 0, g.w, g.h);
  ctx.font = "11px system-ui, sans-serif";

  // Axes: a gridline per decade, a tick per minute of end time.
  ctx.strokeStyle = "#e3e6ea";
  ctx.fillStyle = "#6b7280";
  ctx.textAlign = "right";
  ctx.textBaseline = "middle";
  for (let e = g.lo; e <= g.hi; e++) {
    const y = g.y(10 ** e);
    ctx.beginPath(); ctx.moveTo(PAD.left, y); ctx.lineTo(g.right, y); ctx.stroke();
    ctx.fillText(decadeLabel(e), PAD.left - 6, y);
  }
  ctx.textAlign = "center";
  ctx.textBaseline = "top";
  for (let t = Math.ceil((g.now - WINDOW) / 60) * 60; t <= g.now; t += 60) {
    const x = g.x(t);
    ctx.beginPath(); ctx.moveTo(x, PAD.top); ctx.lineTo(x, g.bottom); ctx.stroke();
    ctx.fillText(fmtClock(t), x, g.bottom + 5);
  }
  ctx.strokeStyle = "#9aa1ab";
  ctx.strokeRect(PAD.left, PAD.top, g.right - PAD.left, g.bottom - PAD.top);

  // Dots, errors drawn last so they stay visible over a crowd of fast requests.
  const colours = { ok: cssVar("--ok"), client: cssVar("--client"), error: cssVar("--error"), other: cssVar("--other") };
  const chosen = new Set(state.selected.map((r) => r.seq));
  const oldest = g.now - WINDOW;
  const drawn = [];
  for (const cls of ["other", "ok", "client", "error"]) {
    // One path per colour (and per selected or not): 20,000 dots stay cheap to redraw.
    const dots = new Path2D(), picked = new Path2D();
    for (const r of state.records) {
      if (r.end < oldest || outcomeClass(r) !== cls) continue;
      const x = g.x(r.end), y = g.y(r.duration);
      const path = chosen.has(r.seq) ? picked : dots;
      path.moveTo(x + 2.5, y);
      path.arc(x, y, 2.5, 0, 2 * Math.PI);
      drawn.push([r, x, y]);
    }
    // With a selection, the rest fade.
    ctx.fillStyle = colours[cls];
    ctx.globalAlpha = chosen.size ? 0.2 : 1;
    ctx.fill(dots);
    ctx.globalAlpha = 1;
    ctx.fill(picked);
  }
  state.drawn = drawn;
  canvas.dataset.dots = String(drawn.length);

  if (state.drag) {
    const d = state.drag;
    ctx.fillStyle = "rgba(47,111,222,0.12)";
    ctx.strokeStyle = "rgba(47,111,222,0.8)";
    ctx.fillRect(Math.min(d.x0, d.x1), Math.min(d.y0, d.y1), Math.abs(d.x1 - d.x0), Math.abs(d.y1 - d.y0));
    ctx.strokeRect(Math.min(d.x0, d.x1), Math.min(d.y0, d.y1), Math.abs(d.x1 - d.x0), Math.abs(d.y1 - d.y0));
  }
}

function canvasPoint(ev) {
  const b = $("xview").getBoundingClientRect();
  return [ev.clientX - b.left, ev.clientY - b.top];
}

// A box that reaches into the margins (or past the canvas) extends to infinity on that side,
// so a drag over the whole plot catches the dots drawn on its very edges.
function select(d) {
  const g = geometry($("xview"));
  let x0 = Math.min(d.x0, d.x1), x1 = Math.max(d.x0, d.x1);
  let y0 = Math.min(d.y0, d.y1), y1 = Math.max(d.y0, d.y1);
  if (x0 <= PAD.left) x0 = -Infinity;
  if (x1 >= g.right) x1 = Infinity;
  if (y0 <= PAD.top) y0 = -Infinity;
  if (y1 >= g.bottom) y1 = Infinity;
  state.selected = state.drawn
    .filter(([, x, y]) => x >= x0 && x <= x1 && y >= y0 && y <= y1)
    .map(([r]) => r)
    .sort((a, b) => b.duration - a.duration);
  state.chosenSeq = null;
  $("profile").hidden = true;
  renderSelection();
}

function setupDrag() {
  const canvas = $("xview");
  canvas.addEventListener("mousedown", (ev) => {
    if (ev.button !== 0) return;
    ev.preventDefault();
    const [x, y] = canvasPoint(ev);
    state.drag = { x0: x, y0: y, x1: x, y1: y };
  });
  let pending = false; // one redraw per animation frame, however fast the mouse moves
  window.addEventListener("mousemove", (ev) => {
    if (!state.drag) return;
    [state.drag.x1, state.drag.y1] = canvasPoint(ev);
    if (!pending) {
      pending = true;
      requestAnimationFrame(() => { pending = false; drawScatter(); });
    }
  });
  window.addEventListener("mouseup", (ev) => {
    if (!state.drag) return;
    [state.drag.x1, state.drag.y1] = canvasPoint(ev);
    const d = state.drag;
    state.drag = null;
    select(d);
    drawScatter();
  });
  window.addEventListener("resize", drawScatter);
}

// ---- selection table and profile --------------------------------------------------------

function renderSelection() {
  const table = $("selection");
  const tbody = table.tBodies[0];
  const sel = state.selected;
  table.dataset.selected = String(sel.length);
  $("selection-info").textContent = sel.length === 0 ? "No requests selected." :
    `${sel.length} requests selected, slowest first` +
    (sel.length > SHOWN_ROWS ? ` (the first ${SHOWN_ROWS} listed)` : "") + ". Click a row for its profile.";
  const rows = sel.slice(0, SHOWN_ROWS).map((r) => {
    const tr = el("tr", {},
      el("td", {}, fmtClock(r.end, true)),
      el("td", { className: "text" }, r.service),
      el("td", { className: "text" }, r.method),
      el("td", { className: "route", title: r.route }, r.route),
      el("td", { className: outcomeClass(r) === "error" ? "bad" : "" }, r.status === null ? r.outcome : r.status),
      el("td", {}, r.worker),
      el("td", {}, r.pid),
      el("td", {}, fmtDur(r.duration)),
      el("td", {}, fmtDur(r.cpu_time)),
      el("td", {}, fmtDur(r.downstream_time)),
      el("td", {}, fmtDur(r.gc_time)),
      el("td", {}, fmtDur(r.write_time)),
      el("td", {}, r.blocks),
      el("td", {}, fmtBytes(r.bytes)));
    tr.dataset.seq = String(r.seq);
    tr.dataset.calls = String(r.calls.length);
    tr.addEventListener("click", () => showProfile(r, tr));
    return tr;
  });
  tbody.replaceChildren(...rows);
}

function showProfile(r, tr) {
  for (const row of $("selection").tBodies[0].rows) row.classList.toggle("chosen", row === tr);
  state.chosenSeq = r.seq;
  const p = $("profile");
  p.dataset.seq = String(r.seq);
  p.hidden = false;
  const status = r.status === null ? r.outcome : `${r.status} (${r.outcome})`;
  const head = el("h3", {}, `${r.method} ${r.route} → ${status} in ${fmtDur(r.duration)}`);
  const meta = el("div", { className: "muted" },
    `${r.service} · worker ${r.worker} · pid ${r.pid} · started ${fmtClock(r.start, true)} · ` +
    `${r.blocks} blocks in ${r.write_calls} writes, ${fmtBytes(r.bytes)}` +
    (r.accept_wait === null ? "" : ` · waited ${fmtDur(r.accept_wait)} to be accepted`));

  // Where the time went: each part as a share of the duration (they may overlap).
  const parts = [["CPU", r.cpu_time], ["downstream", r.downstream_time], ["GC", r.gc_time], ["write", r.write_time]];
  const breakdown = el("div", { className: "breakdown" });
  for (const [name, v] of parts) {
    const share = v === null || r.duration <= 0 ? 0 : Math.min(1, v / r.duration);
    const fill = el("div", { className: "fill" });
    fill.style.width = (share * 100).toFixed(1) + "%";
    breakdown.append(el("div", {}, name), el("div", { className: "track" }, fill),
      el("div", { className: "val" }, v === null ? "not measured" : `${fmtDur(v)} · ${pct(share)}`));
  }

  // Timeline: the request as the whole bar, each listed downstream call where it happened.
  const timeline = el("div", { className: "timeline", title: "request timeline; downstream calls in orange" });
  for (const c of r.calls) {
    const seg = el("div", { className: "call" + (c.outcome === "error" ? " error" : ""),
      title: `${c.protocol} ${c.peer} ${c.operation}: ${fmtDur(c.duration)}` });
    const span = r.duration > 0 ? r.duration : 1;
    seg.style.left = Math.min(100, (c.offset / span) * 100).toFixed(2) + "%";
    seg.style.width = Math.min(100, (c.duration / span) * 100).toFixed(2) + "%";
    timeline.append(seg);
  }

  const calls = el("table", { id: "calls" },
    el("thead", {}, el("tr", {}, ...["protocol", "peer", "operation", "outcome", "offset", "duration"]
      .map((h, i) => el("th", { className: i < 4 ? "text" : "" }, h)))),
    el("tbody", {}, ...r.calls.map((c) => el("tr", {},
      el("td", { className: "text" }, c.protocol),
      el("td", { className: "text" }, c.peer),
      el("td", { className: "route", title: c.operation }, c.operation),
      el("td", { className: c.outcome === "error" ? "bad text" : "text" }, c.outcome),
      el("td", {}, fmtDur(c.offset)),
      el("td", {}, fmtDur(c.duration))))));
  const summary = el("div", { className: "muted" },
    `${r.calls.length} downstream calls listed` +
    (r.calls_not_listed > 0 ? `, ${r.calls_not_listed} more not listed (over the per-request cap)` : "") +
    `; downstream total ${fmtDur(r.downstream_time)}.`);
  p.replaceChildren(head, meta, breakdown, timeline, summary, r.calls.length ? calls : el("span"));
}

// ---- Active Service ---------------------------------------------------------------------

const BAR_LO = -3, BAR_HI = 2; // bar scale: log10 seconds, 1 ms – 100 s

function ageClass(s) {
  return s < 1 ? "age0" : s < 3 ? "age1" : s < 10 ? "age2" : "age3";
}

function doingText(q) {
  let t = q.doing;
  if (q.doing === "downstream" && q.wait) t += ` ${q.wait.protocol} ${q.wait.peer} ${q.wait.operation}`;
  if (q.doing_for !== null && q.doing_for !== undefined) t += ` for ${fmtDur(q.doing_for)}`;
  // Whether its thread runs now tells a busy loop from a sleep or a lock.
  if (q.on_cpu === true || q.on_cpu === false) t += q.on_cpu ? " · on CPU" : " · off CPU";
  if (typeof q.cpu_time === "number") t += ` · CPU ${fmtDur(q.cpu_time)}`;
  return t;
}

function renderActive(workers) {
  const byService = new Map();
  for (const w of [...workers].sort((a, b) => a.worker - b.worker)) {
    if (!byService.has(w.service)) byService.set(w.service, []);
    byService.get(w.service).push(w);
  }
  const groups = [...byService.keys()].sort().map((service) => {
    const list = byService.get(service);
    const busy = list.filter((w) => w.requests.length > 0).length;
    const rows = list.map((w) => {
      const q = w.requests[0];
      const row = el("div", { className: "worker" });
      Object.assign(row.dataset, {
        worker: String(w.worker), service: w.service, pid: String(w.pid), state: w.state,
        route: q ? q.route : "", doing: q ? q.doing : "",
      });
      const bar = el("div", { className: "bar" });
      let what = "idle";
      if (q) {
        const f = (Math.log10(Math.max(q.elapsed, 1e-3)) - BAR_LO) / (BAR_HI - BAR_LO);
        bar.style.width = (Math.min(1, Math.max(0.01, f)) * 100).toFixed(1) + "%";
        bar.classList.add(ageClass(q.elapsed));
        what = `${q.method} ${q.route} · ${fmtDur(q.elapsed)} · ${doingText(q)}` +
          (w.requests.length > 1 ? ` · +${w.requests.length - 1} more` : "");
      }
      row.append(el("div", { className: "who" }, `worker ${w.worker} · pid ${w.pid}`),
        el("div", { className: "track" }, bar), el("div", { className: "what", title: what }, what));
      return row;
    });
    return el("div", { className: "service" },
      el("h3", {}, service, el("span", { className: "muted" }, ` — ${busy} of ${list.length} workers busy`)), ...rows);
  });
  $("active").replaceChildren(...(groups.length ? groups : [el("div", { className: "muted" }, "No workers.")]));
}

// ---- routes -----------------------------------------------------------------------------

function renderRoutes() {
  const { key, desc } = state.sort;
  const rows = [...state.routes].sort((a, b) => {
    const c = typeof a[key] === "string" ? a[key].localeCompare(b[key]) : a[key] - b[key];
    return desc ? -c : c;
  });
  for (const th of $("routes").tHead.rows[0].cells) {
    th.classList.toggle("sorted", th.dataset.key === key);
    th.classList.toggle("asc", th.dataset.key === key && !desc);
  }
  $("routes").tBodies[0].replaceChildren(...rows.map((r) => {
    const tr = el("tr", {},
      el("td", { className: "text" }, r.service),
      el("td", { className: "route", title: r.route }, r.route),
      el("td", {}, r.requests),
      el("td", {}, r.rate.toFixed(2)),
      el("td", {}, fmtDur(r.p50)),
      el("td", {}, fmtDur(r.p99)),
      el("td", {}, fmtDur(r.total_time)),
      el("td", { className: r.error_ratio > 0 ? "bad" : "" }, pct(r.error_ratio)),
      el("td", {}, r.mean_blocks.toFixed(1)),
      el("td", {}, pct(r.cpu_share)),
      el("td", {}, pct(r.downstream_share)),
      el("td", {}, pct(r.gc_share)),
      el("td", {}, pct(r.write_share)));
    Object.assign(tr.dataset, { route: r.route, service: r.service, requests: String(r.requests) });
    return tr;
  }));
}

function setupSort() {
  for (const th of $("routes").tHead.rows[0].cells) {
    th.addEventListener("click", () => {
      const key = th.dataset.key;
      // Names sort A→Z first, figures largest first.
      state.sort = state.sort.key === key ? { key, desc: !state.sort.desc } : { key, desc: key !== "route" && key !== "service" };
      renderRoutes();
    });
  }
}

setupDrag();
setupSort();
tick();
