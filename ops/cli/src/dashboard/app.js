// Ferry's dashboard page: log in, then draw each snapshot the server pushes
// over server-sent events (/live). No polling, no libraries: the archive is
// asked only when a person picks a time range or an agent.
"use strict";

const $ = (id) => document.getElementById(id);

function text(tag, value, cls) {
  const e = document.createElement(tag);
  e.textContent = value;
  if (cls) e.className = cls;
  return e;
}

function row(cells) {
  const tr = document.createElement("tr");
  for (const c of cells) tr.appendChild(c instanceof Node ? c : text("td", c));
  return tr;
}

function ago(ts, now) {
  if (!ts) return "never";
  const s = Math.max(0, Math.round((Date.parse(now) - Date.parse(ts)) / 1000));
  return s + " s ago";
}

// A line chart of one or more series on a canvas, scaled to their maximum.
// Draws at the canvas's size on screen, so text is not stretched.
function fit(canvas) {
  canvas.width = canvas.clientWidth || canvas.width;
  canvas.height = canvas.clientHeight || canvas.height;
}

function lines(canvas, series, colors, unit = "/s") {
  fit(canvas);
  const g = canvas.getContext("2d");
  const w = canvas.width, h = canvas.height;
  g.clearRect(0, 0, w, h);
  const max = Math.max(1, ...series.flat());
  g.fillStyle = "#555"; g.font = "12px sans-serif";
  g.fillText(Math.round(max) + unit, 4, 12);
  series.forEach((s, i) => {
    g.strokeStyle = colors[i]; g.lineWidth = 2; g.beginPath();
    s.forEach((v, x) => {
      const px = (x / Math.max(1, s.length - 1)) * (w - 8) + 4;
      const py = h - 4 - (v / max) * (h - 20);
      if (x === 0) g.moveTo(px, py); else g.lineTo(px, py);
    });
    g.stroke();
  });
}

// Bars of labelled values (with a failed part in red).
function bars(canvas, items) {
  fit(canvas);
  const g = canvas.getContext("2d");
  const w = canvas.width, h = canvas.height;
  g.clearRect(0, 0, w, h);
  const max = Math.max(1, ...items.map((i) => i.total));
  const bw = Math.max(8, Math.min(80, (w - 10) / Math.max(1, items.length) - 10));
  g.font = "12px sans-serif";
  items.forEach((it, i) => {
    const x = 5 + i * (bw + 10);
    const th = (it.total / max) * (h - 34), fh = (it.failed / max) * (h - 34);
    g.fillStyle = "#4c7cf3"; g.fillRect(x, h - 18 - th, bw, th);
    g.fillStyle = "#b3261e"; g.fillRect(x, h - 18 - fh, bw, fh);
    g.fillStyle = "#333"; g.fillText(it.intent.slice(0, 12), x, h - 4);
  });
}

// A table body of rows made from `items` by `cells`.
function fill(id, items, cells) {
  $(id).replaceChildren(...items.map((it) => row(cells(it))));
}

const ms = (v) => (v === null || v === undefined ? "-" : Number(v).toFixed(1));

function alertLine(a, withButton) {
  const li = text("li", `${a.state}: ${a.message} (${new Date(a.ts).toLocaleTimeString()})`, a.state);
  if (a.acknowledged_by) {
    li.appendChild(text("span", ` acknowledged by ${a.acknowledged_by}`, "acked"));
  } else if (withButton && a.state === "firing") {
    const b = text("button", "Acknowledge", "ack");
    b.onclick = () => acknowledge(a.id, b);
    li.appendChild(document.createTextNode(" "));
    li.appendChild(b);
  }
  return li;
}

async function acknowledge(id, button) {
  button.disabled = true;
  const r = await fetch("/alerts/ack", { method: "POST", body: new URLSearchParams({ id }) });
  if (r.ok) {
    const a = await r.json();
    button.replaceWith(text("span", ` acknowledged by ${a.acknowledged_by}`, "acked"));
  } else {
    button.disabled = false;
    $("ack-error").textContent = await r.text();
  }
}

async function showAgent(id) {
  $("agent-detail").hidden = false;
  $("agent-name").textContent = id;
  const r = await fetch("/agent?id=" + encodeURIComponent(id));
  if (!r.ok) {
    $("agent-events").replaceChildren(row([await r.text()]));
    $("agent-replies").replaceChildren();
    return;
  }
  const a = await r.json();
  const t = (ts) => new Date(ts).toLocaleString();
  fill("agent-events", a.events, (e) => [t(e.ts), e.kind, e.text]);
  fill("agent-replies", a.replies, (e) => [t(e.ts), e.kind, `${e.step} ${e.by}`, e.text]);
}

let range = "live";

async function showRange(r) {
  range = r;
  for (const b of document.querySelectorAll("#ranges button")) b.classList.toggle("on", b.dataset.range === r);
  $("history").hidden = r === "live";
  if (r === "live") return;
  $("history-status").textContent = "loading " + r + " ...";
  const resp = await fetch("/history?range=" + r);
  if (!resp.ok) {
    $("history-status").textContent = await resp.text();
    return;
  }
  const h = await resp.json();
  const sum = (xs) => xs.reduce((a, b) => a + b, 0);
  $("history-status").textContent = `${new Date(h.from).toLocaleString()} to ${new Date(h.to).toLocaleString()}`;
  $("history-events").textContent = sum(h.events);
  $("history-replies").textContent = sum(h.replies);
  $("history-interactions").textContent = sum(h.interactions);
  $("history-failed").textContent = sum(h.failed);
  $("history-latency").textContent = `${ms(h.latency_ms.p50)} / ${ms(h.latency_ms.p95)} / ${ms(h.latency_ms.p99)}`;
  lines($("history-traffic"), [h.events, h.replies], ["#4c7cf3", "#137333"], "");
  lines($("history-errors"), [h.interactions, h.failed], ["#4c7cf3", "#b3261e"], "");
  const g = (it) => [it.name, String(it.total), String(it.failed), ms(it.mean_ms)];
  fill("history-by-model", h.groups.by_model, g);
  fill("history-by-agent", h.groups.by_agent, g);
  fill("history-by-error", h.groups.by_error, g);
}

function draw(s) {
  $("status").textContent = "live, " + new Date(s.now).toLocaleTimeString();
  $("events-total").textContent = s.events;
  $("replies-total").textContent = s.replies;
  $("lat-p50").textContent = ms(s.latency_ms.p50);
  $("lat-p95").textContent = ms(s.latency_ms.p95);
  $("lat-p99").textContent = ms(s.latency_ms.p99);
  $("kinds").replaceChildren(...Object.entries(s.events_by_kind).map(([k, n]) => row([k, String(n)])));
  lines($("traffic"), [s.series.events, s.series.replies], ["#4c7cf3", "#137333"]);
  $("agents").replaceChildren(...s.agents.map((a) => {
    const state = text("td", a.online ? "online" : "offline", a.online ? "online" : "offline");
    const tr = row([a.id, state, ago(a.last_heartbeat, s.now), a.cpu_percent.toFixed(1) + " %",
      (a.rss_bytes / 1048576).toFixed(0) + " MiB", String(a.spool_depth), a.version || "-"]);
    tr.className = "agent";
    tr.onclick = () => showAgent(a.id);
    return tr;
  }));
  const i = s.interactions;
  $("interactions-total").textContent = i.total;
  $("interactions-failed").textContent = i.failed;
  $("error-rate").textContent = i.total ? ((100 * i.failed) / i.total).toFixed(1) : "-";
  $("p50").textContent = ms(i.response_ms_p50);
  $("p95").textContent = ms(i.response_ms_p95);
  bars($("intents"), i.by_intent);
  lines($("response-trend"), [s.series.response_ms.map((v) => v ?? 0)], ["#8a4cf3"], " ms");
  const t = (it, key) => [it[key], String(it.total), String(it.failed), ms(it.mean_ms)];
  fill("by-model", i.by_model, (it) => t(it, "model"));
  fill("by-agent", i.by_agent, (it) => t(it, "agent"));
  fill("by-tool", Object.entries(i.by_tool), ([k, n]) => [k, String(n)]);
  fill("by-error", Object.entries(i.by_error), ([k, n]) => [k, String(n)]);
  $("tokens").textContent = s.inference.tokens_per_s.toFixed(1);
  $("inference-queue").textContent = s.inference.queue;
  fill("steps", Object.entries(s.inference.steps), ([k, n]) => [k, String(n)]);
  fill("consumers", s.pipeline.consumers, (c) => [c.stream, c.consumer, String(c.pending), String(c.ack_pending), String(c.redelivered)]);
  fill("replicas", Object.entries(s.pipeline.replicas), ([k, n]) => [k, String(n)]);
  fill("dead", Object.entries(s.pipeline.dead_letters), ([k, n]) => [k, String(n)]);
  $("alerts-firing").replaceChildren(...s.alerts.firing.map((a) => alertLine(a, true)));
  $("alerts-recent").replaceChildren(...s.alerts.recent.map((a) => alertLine(a, false)));
}

for (const b of document.querySelectorAll("#ranges button")) b.onclick = () => showRange(b.dataset.range);

function connect() {
  const source = new EventSource("/live");
  source.onmessage = (m) => draw(JSON.parse(m.data));
  source.onerror = () => { $("status").textContent = "reconnecting ..."; };
  return source;
}

async function start() {
  // A session lets /live answer; without one it says 401 and we show the form.
  const probe = await fetch("/live", { headers: { Accept: "text/event-stream" } });
  if (probe.status === 200) {
    probe.body.cancel();
    $("app").hidden = false;
    connect();
    return;
  }
  $("login").hidden = false;
}

$("login-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  const body = new URLSearchParams({ user: $("user").value, password: $("password").value });
  const r = await fetch("/login", { method: "POST", body, redirect: "manual" });
  if (r.status === 401) {
    $("login-error").textContent = "Wrong user or password.";
    return;
  }
  $("login").hidden = true;
  $("app").hidden = false;
  connect();
});

start();
