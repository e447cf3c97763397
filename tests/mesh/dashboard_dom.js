// Runs the dashboard's script against a running controller without a browser: a minimal DOM (only
// what app.js touches) stands in for the page, `fetch` goes to the real dashboard over HTTP with
// the admin token as a bearer (node's fetch keeps no cookies), and the drawn page is printed as
// text for the Rust test to check. The browser-free check; observe/chromium.rs loads the page in
// headless Chromium.
//
// node dashboard_dom.js APP_JS BASE_URL TOKEN
"use strict";

const fs = require("fs");
const vm = require("vm");

const [appJs, base, token] = process.argv.slice(2);

class Node {
  constructor(tag) {
    this.tag = tag;
    this.attrs = {};
    this.children = [];
    this.text = "";
    this.hidden = false;
    this.className = "";
    this.listeners = {};
  }
  setAttribute(k, v) { this.attrs[k] = String(v); }
  appendChild(c) { this.children.push(c); return c; }
  replaceChildren() { this.children = []; }
  set textContent(t) { this.text = String(t); this.children = []; }
  get textContent() { return this.text + this.children.map((c) => c.textContent).join(""); }
  querySelector(sel) { return this.children.find((c) => c.tag === sel) || null; }
  addEventListener(ev, f) { this.listeners[ev] = f; }
  dump(indent) {
    const a = Object.entries(this.attrs).map(([k, v]) => ` ${k}="${v}"`).join("");
    const cls = this.className ? ` class="${this.className}"` : "";
    const inner = this.children.map((c) => c.dump(indent + "  ")).join("");
    return `${indent}<${this.tag}${a}${cls}${this.hidden ? " hidden" : ""}>${this.text}\n${inner}`;
  }
}

const ids = {};
for (const id of ["status", "window", "logout", "login", "login-form", "login-error", "view", "graph",
  "proxies-count", "controller"]) {
  ids[id] = new Node(id === "graph" ? "svg" : "div");
}
ids.window.value = "60";
ids.view.hidden = true;
ids.login.hidden = true;
for (const id of ["services", "edges", "proxies"]) {
  ids[id] = new Node("table");
  ids[id].appendChild(new Node("tbody"));
}

const listeners = {};
const document = {
  getElementById: (id) => ids[id],
  createElement: (tag) => new Node(tag),
  createElementNS: (_ns, tag) => new Node(tag),
  addEventListener: (ev, f) => { listeners[ev] = f; },
};

const realFetch = globalThis.fetch;
let polled = 0;
const context = {
  document,
  location: { hash: "", pathname: "/" },
  history: { replaceState: () => {} },
  fetch: async (url, opts = {}) => {
    polled += 1;
    const headers = { ...(opts.headers || {}), authorization: `Bearer ${token}` };
    return realFetch(base + url, { ...opts, headers });
  },
  setInterval: () => 1,
  clearInterval: () => {},
  FormData: class {},
  console,
  Date,
  Math,
  Object,
  String,
  Map,
  Number,
};
vm.createContext(context);
vm.runInContext(fs.readFileSync(appJs, "utf8"), context, { filename: "app.js" });
listeners.DOMContentLoaded();

const deadline = Date.now() + 5000;
(function wait() {
  if (polled > 0 && !ids.view.hidden && ids.graph.children.length > 0) {
    process.stdout.write(Object.values(ids).map((n) => n.dump("")).join(""));
    return;
  }
  if (Date.now() > deadline) {
    process.stderr.write("the page never drew: " + ids.status.textContent + "\n");
    process.exit(1);
  }
  setTimeout(wait, 20);
})();
