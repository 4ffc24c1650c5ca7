// Ferry's dashboard page: log in, then draw each snapshot the server pushes
// over server-sent events (/live). No polling, no libraries.
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

function lines(canvas, series, colors) {
  fit(canvas);
  const g = canvas.getContext("2d");
  const w = canvas.width, h = canvas.height;
  g.clearRect(0, 0, w, h);
  const max = Math.max(1, ...series.flat());
  g.fillStyle = "#555"; g.font = "12px sans-serif";
  g.fillText(max + "/s", 4, 12);
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

function alertLine(a) {
  return text("li", `${a.state}: ${a.message} (${new Date(a.ts).toLocaleTimeString()})`, a.state);
}

function draw(s) {
  $("status").textContent = "live, " + new Date(s.now).toLocaleTimeString();
  $("events-total").textContent = s.events;
  $("replies-total").textContent = s.replies;
  $("kinds").replaceChildren(...Object.entries(s.events_by_kind).map(([k, n]) => row([k, String(n)])));
  lines($("traffic"), [s.series.events, s.series.replies], ["#4c7cf3", "#137333"]);
  $("agents").replaceChildren(...s.agents.map((a) => {
    const state = text("td", a.online ? "online" : "offline", a.online ? "online" : "offline");
    return row([a.id, state, ago(a.last_heartbeat, s.now), a.cpu_percent.toFixed(1) + " %",
      (a.rss_bytes / 1048576).toFixed(0) + " MiB", String(a.spool_depth), a.version || "-"]);
  }));
  $("interactions-total").textContent = s.interactions.total;
  $("interactions-failed").textContent = s.interactions.failed;
  $("p50").textContent = s.interactions.response_ms_p50 ?? "-";
  $("p95").textContent = s.interactions.response_ms_p95 ?? "-";
  bars($("intents"), s.interactions.by_intent);
  $("alerts-firing").replaceChildren(...s.alerts.firing.map(alertLine));
  $("alerts-recent").replaceChildren(...s.alerts.recent.map(alertLine));
}

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
