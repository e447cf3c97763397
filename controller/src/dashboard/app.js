// The dashboard: logs in with the admin token (form, or #token=... in the address, which the
// browser never sends), then polls /api/overview every two seconds and redraws.
"use strict";

const $ = (id) => document.getElementById(id);
const SVG = "http://www.w3.org/2000/svg";
let timer = null;

function pct(x) { return (x * 100).toFixed(2) + "%"; }
function ms(x) { return x.toFixed(1) + "ms"; }
function rate(x) { return x.toFixed(1); }
function health(sr, requests) {
  if (!requests) return "";
  return sr >= 0.99 ? "good" : sr >= 0.95 ? "warn" : "bad";
}
function expiresIn(s) {
  if (s < 0) return "expired";
  if (s < 3600) return Math.floor(s / 60) + " min";
  if (s < 172800) return (s / 3600).toFixed(1) + " h";
  return Math.floor(s / 86400) + " d";
}

function cell(tr, text, cls) {
  const td = document.createElement("td");
  td.textContent = text;
  if (cls) td.className = cls;
  tr.appendChild(td);
}

function fill(id, rows, cells) {
  const body = $(id).querySelector("tbody");
  body.replaceChildren();
  for (const r of rows) {
    const tr = document.createElement("tr");
    for (const [text, cls] of cells(r)) cell(tr, text, cls);
    body.appendChild(tr);
  }
}

function short(node) {
  const i = node.lastIndexOf("/sa/");
  return i >= 0 ? node.slice(i + 4) : node;
}

// Layered layout: a node's column is the longest chain of callers before it.
function layout(nodes, edges) {
  const depth = new Map(nodes.map((n) => [n, 0]));
  for (let round = 0; round < nodes.length; round++) {
    let moved = false;
    for (const e of edges) {
      if (e.from === e.to) continue;
      const d = (depth.get(e.from) || 0) + 1;
      if (d > (depth.get(e.to) || 0) && d < nodes.length) { depth.set(e.to, d); moved = true; }
    }
    if (!moved) break;
  }
  const columns = new Map();
  for (const n of nodes) {
    const d = depth.get(n);
    if (!columns.has(d)) columns.set(d, []);
    columns.get(d).push(n);
  }
  const pos = new Map();
  let rows = 1;
  for (const [d, list] of columns) {
    rows = Math.max(rows, list.length);
    list.forEach((n, i) => pos.set(n, { x: 110 + d * 300, y: 50 + i * 90 }));
  }
  return { pos, width: 220 + Math.max(...columns.keys()) * 300, height: 40 + rows * 90 };
}

function el(name, attrs, parent) {
  const e = document.createElementNS(SVG, name);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
  parent.appendChild(e);
  return e;
}

function drawGraph(o) {
  const svg = $("graph");
  svg.replaceChildren();
  const { pos, width, height } = layout(o.nodes, o.edges);
  svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
  svg.setAttribute("height", height);
  const defs = el("defs", {}, svg);
  const m = el("marker", { id: "arrow", viewBox: "0 0 10 10", refX: 10, refY: 5, markerWidth: 8, markerHeight: 8, orient: "auto" }, defs);
  el("path", { d: "M0,0 L10,5 L0,10 z", fill: "#555" }, m);
  for (const e of o.edges) {
    const a = pos.get(e.from), b = pos.get(e.to);
    if (!a || !b) continue;
    const g = el("g", { class: "edge " + health(e.success_rate, e.requests), "data-from": e.from, "data-to": e.to }, svg);
    el("line", { x1: a.x + 90, y1: a.y, x2: b.x - 90, y2: b.y, "marker-end": "url(#arrow)" }, g);
    const t = el("text", { x: (a.x + b.x) / 2, y: (a.y + b.y) / 2 - 8 }, g);
    t.textContent = `${rate(e.rps)} rps · ${e.requests ? pct(e.success_rate) : "-"} · p99 ${e.requests ? ms(e.p99_ms) : "-"}`;
  }
  for (const n of o.nodes) {
    const p = pos.get(n);
    const g = el("g", { class: "node", "data-node": n }, svg);
    el("rect", { x: p.x - 90, y: p.y - 18, width: 180, height: 36, rx: 6 }, g);
    const t = el("text", { x: p.x, y: p.y }, g);
    t.textContent = short(n);
    el("title", {}, g).textContent = n;
  }
}

function draw(o) {
  drawGraph(o);
  fill("services", o.services, (s) => {
    const has = s.requests > 0;
    return [
      [s.service, "name"], [s.direction, ""], [has ? pct(s.success_rate) : "-", health(s.success_rate, s.requests)],
      [rate(s.rps), ""], [has ? ms(s.p50_ms) : "-", ""], [has ? ms(s.p95_ms) : "-", ""], [has ? ms(s.p99_ms) : "-", ""],
      [String(s.tcp_open), ""], [pct(s.mtls_share), ""], [String(s.requests), ""],
    ];
  });
  fill("edges", o.edges, (e) => [
    [short(e.from), "name"], [e.to, "name"], [e.source, "name"], [e.requests ? pct(e.success_rate) : "-", health(e.success_rate, e.requests)],
    [rate(e.rps), ""], [e.requests ? ms(e.p99_ms) : "-", ""], [String(e.requests), ""],
  ]);
  fill("proxies", o.proxies, (p) => [
    [p.name, "name"], [p.identity, "name"], [p.address, "name"],
    [expiresIn(p.cert_expires_in_s), p.cert_expires_in_s < 600 ? "bad" : ""],
  ]);
  $("proxies-count").textContent = `${o.proxies_connected} connected`;
  const refused = Object.entries(o.reports_refused).map(([k, v]) => `${k} ${v}`).join(", ") || "none";
  $("controller").textContent = `reports accepted ${o.reports_accepted}, refused: ${refused}; edges held ${o.edges_held} of ${o.edges_max}`;
  $("status").textContent = "updated " + new Date(o.now_unix * 1000).toISOString().slice(11, 19) + " UTC";
}

function showLogin(message) {
  clearInterval(timer);
  timer = null;
  $("view").hidden = true;
  $("logout").hidden = true;
  $("login").hidden = false;
  $("login-error").textContent = message || "";
  $("status").textContent = "logged out";
}

async function poll() {
  let r;
  try {
    r = await fetch("/api/overview?window=" + $("window").value, { credentials: "same-origin" });
  } catch (e) {
    $("status").textContent = "controller unreachable";
    return;
  }
  if (r.status === 401) { showLogin(""); return; }
  if (!r.ok) { $("status").textContent = "error " + r.status; return; }
  const o = await r.json();
  $("login").hidden = true;
  $("view").hidden = false;
  $("logout").hidden = false;
  draw(o);
  if (!timer) timer = setInterval(poll, 2000);
}

async function login(token) {
  const r = await fetch("/login", {
    method: "POST",
    credentials: "same-origin",
    headers: { "content-type": "application/x-www-form-urlencoded" },
    body: "token=" + encodeURIComponent(token),
  });
  if (!r.ok) { showLogin("invalid admin token"); return; }
  await poll();
}

document.addEventListener("DOMContentLoaded", () => {
  $("login-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    login(new FormData(ev.target).get("token"));
  });
  $("window").addEventListener("change", poll);
  const m = location.hash.match(/token=([^&]+)/);
  if (m) {
    history.replaceState(null, "", location.pathname);
    login(decodeURIComponent(m[1]));
  } else {
    poll();
  }
});
