// The federation dashboard: one snapshot per server-sent event from /dashboard/events,
// drawn into the tables and two canvas charts. Peer-supplied strings only ever go through
// textContent (never innerHTML).
"use strict";

const COLORS = ["#2f6fdb", "#d9822b", "#1f9d55", "#b0368f", "#7a5af5", "#c7372f", "#2aa7b8", "#8a8f3c"];

function $(id) { return document.getElementById(id); }

function fmtBytes(n) {
  if (n == null) return "–";
  const units = ["B", "kB", "MB", "GB", "TB"];
  let i = 0;
  while (Math.abs(n) >= 1000 && i < units.length - 1) { n /= 1000; i++; }
  return (i === 0 ? n.toFixed(0) : n.toFixed(n < 10 ? 2 : 1)) + " " + units[i];
}

function fmtAge(s) {
  if (s == null) return "–";
  if (s < 60) return s.toFixed(s < 10 ? 1 : 0) + " s ago";
  if (s < 3600) return (s / 60).toFixed(1) + " min ago";
  return (s / 3600).toFixed(1) + " h ago";
}

function fmtNum(x, digits) {
  if (x == null || !isFinite(x)) return "–";
  return Number(x).toFixed(digits);
}

function fmtSeconds(x, span) {
  return x.toFixed(span < 8 ? 1 : 0);
}

function cell(row, value, cls) {
  const td = document.createElement("td");
  if (value instanceof Node) td.appendChild(value); else td.textContent = value == null ? "–" : String(value);
  if (cls) td.className = cls;
  row.appendChild(td);
  return td;
}

function fillTable(id, rows, columns, emptyText) {
  const body = $(id).tBodies[0];
  const fresh = document.createElement("tbody");
  if (rows.length === 0) {
    const tr = fresh.insertRow();
    const td = cell(tr, emptyText, "empty");
    td.colSpan = $(id).tHead.rows[0].cells.length;
  }
  for (const r of rows) {
    const tr = fresh.insertRow();
    for (const col of columns) {
      const [value, cls] = col(r);
      cell(tr, value, cls);
    }
  }
  body.replaceWith(fresh);
}

function dot(up) {
  const s = document.createElement("span");
  s.className = "dot " + (up ? "up" : "down");
  s.title = up ? "alive" : "not heard from recently";
  return s;
}

function utilBar(u) {
  if (u == null) return "–";
  const outer = document.createElement("span");
  outer.className = "util";
  outer.title = (100 * u).toFixed(0) + "%";
  const inner = document.createElement("div");
  inner.style.width = (100 * Math.max(0, Math.min(1, u))).toFixed(0) + "%";
  outer.appendChild(inner);
  const wrap = document.createElement("span");
  wrap.appendChild(outer);
  wrap.appendChild(document.createTextNode(" " + (100 * u).toFixed(0) + "%"));
  return wrap;
}

function reasons(map) {
  const parts = Object.entries(map || {}).map(([k, v]) => k + " " + v);
  return parts.length ? parts.join(", ") : "0";
}

// ------------------------------------------------------------------ charts

function drawChart(canvas, series, opts) {
  const ratio = window.devicePixelRatio || 1;
  const w = canvas.clientWidth || canvas.width, h = canvas.clientHeight || canvas.height;
  canvas.width = w * ratio; canvas.height = h * ratio;
  const ctx = canvas.getContext("2d");
  ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
  ctx.clearRect(0, 0, w, h);
  const pad = { l: 52, r: 10, t: 10, b: 34 };
  const pts = series.flatMap(s => s.points);
  ctx.font = "11px system-ui, sans-serif";
  ctx.fillStyle = "#6a7382";
  if (pts.length === 0) { ctx.fillText("waiting for data…", pad.l, h / 2); return; }
  let [x0, x1] = [Math.min(...pts.map(p => p[0])), Math.max(...pts.map(p => p[0]))];
  let [y0, y1] = [Math.min(...pts.map(p => p[1])), Math.max(...pts.map(p => p[1]))];
  if (x1 === x0) x1 = x0 + 1;
  if (y1 === y0) { y0 -= 0.5; y1 += 0.5; }
  const yr = y1 - y0; y0 -= 0.05 * yr; y1 += 0.05 * yr;
  const X = x => pad.l + (x - x0) / (x1 - x0) * (w - pad.l - pad.r);
  const Y = y => h - pad.b - (y - y0) / (y1 - y0) * (h - pad.t - pad.b);
  ctx.strokeStyle = "#dde1e7"; ctx.lineWidth = 1;
  const ticks = [];
  if (opts.integer) {  // whole numbers only, each once
    const step = Math.max(1, Math.ceil((y1 - y0) / 4));
    for (let y = Math.ceil(y0); y <= y1; y += step) ticks.push(y);
  } else {
    for (let i = 0; i <= 4; i++) ticks.push(y0 + (y1 - y0) * i / 4);
  }
  for (const y of ticks) {
    ctx.beginPath(); ctx.moveTo(pad.l, Y(y)); ctx.lineTo(w - pad.r, Y(y)); ctx.stroke();
    ctx.fillText(opts.yfmt(y), 4, Y(y) + 4);
  }
  for (let i = 0; i <= 4; i++) {
    const x = x0 + (x1 - x0) * i / 4;
    ctx.fillText(opts.xfmt(x, x1 - x0), X(x) - 12, h - pad.b + 14);
  }
  ctx.fillText(opts.xlabel, w / 2 - 20, h - 4);
  let legendX = pad.l + 6;
  series.forEach((s, i) => {
    ctx.strokeStyle = ctx.fillStyle = s.color || COLORS[i % COLORS.length];
    if (s.dots) {
      for (const p of s.points) { ctx.beginPath(); ctx.arc(X(p[0]), Y(p[1]), 3, 0, 2 * Math.PI); ctx.fill(); }
    } else {
      ctx.lineWidth = 1.6; ctx.beginPath();
      s.points.forEach((p, j) => (j ? ctx.lineTo(X(p[0]), Y(p[1])) : ctx.moveTo(X(p[0]), Y(p[1]))));
      ctx.stroke();
    }
    ctx.fillRect(legendX, pad.t + 2, 8, 8);
    ctx.fillText(s.name, legendX + 11, pad.t + 10);
    legendX += 16 + ctx.measureText(s.name).width + 8;
  });
}

function drawLoss(snap) {
  const start = Math.min(snap.at, ...snap.loss.map(p => p.t), ...snap.models.flatMap(m => m.versions.map(v => v[0])));
  const byIsland = new Map();
  const val = [];
  for (const p of snap.loss) {
    if (p.train_loss != null) {
      if (!byIsland.has(p.island)) byIsland.set(p.island, []);
      byIsland.get(p.island).push([p.t - start, p.train_loss]);
    }
    if (p.val_loss != null) val.push([p.t - start, p.val_loss]);
  }
  const series = [...byIsland.entries()].sort().map(([name, points]) => ({ name, points }));
  if (val.length) series.push({ name: "validation (global)", points: val, dots: true, color: "#1d2430" });
  drawChart($("loss-chart"), series, { xlabel: "seconds", xfmt: fmtSeconds, yfmt: y => y.toFixed(2) });
  const versions = snap.models.map((m, i) => ({
    name: m.model_id, color: COLORS[i % COLORS.length],
    points: m.versions.map(v => [v[0] - start, v[1]]),
  }));
  drawChart($("version-chart"), versions, { xlabel: "seconds", xfmt: fmtSeconds, yfmt: y => y.toFixed(0), integer: true });
}

// ------------------------------------------------------------------ the page

function render(snap) {
  $("who").textContent = snap.name + " (" + snap.role + ")";
  // the global model's version; a run without one (experts only): the newest of its lines
  const global = snap.models.find(m => m.model_id === "global");
  const version = global ? global.version : (snap.models.length ? Math.max(...snap.models.map(m => m.version)) : 0);
  $("version").textContent = String(version);
  $("version-label").textContent = global || !snap.models.length ? "global version" : "newest version (" + snap.models.length + " models)";
  $("vpm").textContent = fmtNum(snap.versions_per_min, 1);
  const alive = snap.islands.filter(r => r.alive).length;
  $("alive").textContent = alive + " / " + snap.islands.length;
  const steps = snap.islands.reduce((a, r) => a + (r.step != null ? r.step : (r.steps_pushed || 0)), 0);
  $("steps").textContent = String(steps);
  // the validation loss of the newest global version any island evaluated
  const vals = snap.loss.filter(p => p.val_loss != null);
  const newest = vals.reduce((a, p) => (a == null || p.val_version >= a.val_version ? p : a), null);
  $("val").textContent = newest ? fmtNum(newest.val_loss, 3) + " @v" + newest.val_version : "–";
  const b = snap.bytes;
  const moved = b.up + b.down;
  $("bytes").textContent = fmtBytes(b.up) + " / " + fmtBytes(b.down) + "  vs  " + fmtBytes(b.ddp) +
    (b.ddp > 0 ? "  (" + (b.ddp / Math.max(1, b.up)).toFixed(0) + "x less sent)" : "");
  $("bytes-bar").style.width = (b.ddp > 0 ? Math.min(100, 100 * moved / b.ddp) : 0).toFixed(1) + "%";
  $("bytes-how").textContent = b.how;

  const islands = [...snap.islands].sort((a, c) => (a.name < c.name ? -1 : 1));
  fillTable("islands", islands, [
    r => [r.name],
    r => [r.model_id],
    r => [dot(r.alive)],
    r => [r.leaf],
    r => [fmtAge(r.age_s)],
    r => [r.step != null ? r.step : r.steps_pushed],
    r => [fmtNum(r.steps_per_s, 2)],
    r => [r.base_version],
    r => [r.staleness],
    r => [fmtBytes(r.bytes_up)],
    r => [fmtBytes(r.bytes_down)],
    r => [utilBar(r.utilization)],
    r => [r.pushes],
    r => [reasons(r.rejected), "text"],
    r => [fmtNum(r.train_loss, 3)],
    r => [r.val_loss != null ? fmtNum(r.val_loss, 3) + " @v" + r.val_version : "–"],
  ], "no island has pushed yet");

  fillTable("aggregators", treeOrder(snap.aggregators), [
    ([a, depth]) => ["\u00a0\u00a0".repeat(depth) + (depth ? "└ " : "") + a.name],
    ([a]) => [a.role],
    ([a]) => [a.parent || (a.role === "root" ? "—" : "?")],
    ([a]) => [a.version],
    ([a]) => [a.buffered],
    ([a]) => [a.outbox],
    ([a]) => [a.workers],
    ([a]) => [fmtBytes(a.wal_bytes) + " (" + a.wal_records + " unmarked)"],
    ([a]) => [fmtNum(a.versions_per_min, 1)],
    ([a]) => [a.children],
    ([a]) => [a.age_s ? fmtAge(a.age_s) : "now"],
  ], "no aggregator");

  fillTable("models", snap.models, [
    m => [m.model_id],
    m => [m.expert ? "expert" : (m.model_id === "global" ? "global model" : "model")],
    m => [m.cluster],
    m => [m.version],
    m => [fmtNum(m.versions_per_min, 1)],
    m => [m.last_version_age_s == null ? "–" : fmtAge(m.last_version_age_s)],
    m => [m.alive + " / " + m.islands],
    m => [m.router_version],
    m => [m.params.toLocaleString()],
  ], "no model");
  renderRouter(snap.router, snap.models);

  fillTable("rejections", snap.rejections.slice(0, 20), [
    r => [fmtAge(r.age_s)], r => [r.at], r => [r.sender], r => [r.model_id], r => [r.reason],
    r => [r.message, "text"],
  ], "none");
  $("bad-reports").textContent = snap.bad_reports ? snap.bad_reports + " malformed dashboard report(s) dropped here" : "";
  drawLoss(snap);
}

function renderRouter(router, models) {
  $("router-section").hidden = !router;
  if (!router) return;
  const status = $("router-status");
  status.textContent = router.status;
  status.className = "badge " + (router.status === "up" ? "up" : "down");
  const about = [router.url];
  if (router.workload) about.push("workload " + router.workload);
  if (router.rule) about.push("rule " + router.rule);
  if (router.router) about.push("router " + router.router);
  about.push(router.age_s == null ? "never answered" : "answered " + fmtAge(router.age_s));
  if (router.error) about.push(router.error);
  $("router-about").textContent = about.join(" · ");
  const lines = new Set(models.map(m => m.model_id));
  fillTable("router-experts", router.experts || [], [
    e => [e.id], e => [e.cluster], e => [e.version], e => [e.output], e => [e.train_steps],
    e => [lines.has(e.id) ? "yes" : "no (trained alone)"],
  ], "the router has not said which experts it serves");
}

function treeOrder(aggregators) {
  const names = new Set(aggregators.map(a => a.name));
  const kids = new Map();
  const tops = [];
  for (const a of aggregators) {
    if (a.parent && names.has(a.parent) && a.parent !== a.name) {
      if (!kids.has(a.parent)) kids.set(a.parent, []);
      kids.get(a.parent).push(a);
    } else tops.push(a);
  }
  const out = [];
  const seen = new Set();
  const visit = (a, depth) => {
    if (seen.has(a.name)) return;
    seen.add(a.name);
    out.push([a, depth]);
    for (const c of (kids.get(a.name) || []).sort((x, y) => (x.name < y.name ? -1 : 1))) visit(c, depth + 1);
  };
  tops.forEach(a => visit(a, 0));
  return out;
}

function connect() {
  const link = $("link");
  const source = new EventSource("/dashboard/events");
  source.addEventListener("snapshot", (ev) => {
    link.textContent = "live, " + new Date().toLocaleTimeString();
    link.className = "link live";
    render(JSON.parse(ev.data));
  });
  source.onerror = () => {
    link.textContent = "disconnected; reconnecting…";
    link.className = "link down";
  };
}

connect();
