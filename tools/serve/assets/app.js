// pgtrail's page: reads the same JSON API any client reads. Every value from the archive is
// put on the page as text (textContent), never as HTML.
"use strict";

const state = { table: null, tables: [], token: sessionStorage.getItem("pgtrail-token"), next: null, live: null };

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") e.className = v; else if (k.startsWith("on")) e.addEventListener(k.slice(2), v); else e.setAttribute(k, v);
  }
  for (const c of children) if (c !== null && c !== undefined) e.append(c instanceof Node ? c : String(c));
  return e;
}

function show(text) { document.getElementById("message").textContent = text || ""; }

async function api(path) {
  const headers = state.token ? { Authorization: "Bearer " + state.token } : {};
  const r = await fetch(path, { headers });
  if (r.status === 401) {
    const t = prompt("This server needs its token:");
    if (t) { state.token = t; sessionStorage.setItem("pgtrail-token", t); return api(path); }
  }
  const body = await r.json();
  if (!r.ok) throw new Error(body.error || r.statusText);
  return body;
}

function text(v) {
  if (v === null || v === undefined) return "∅";
  return typeof v === "object" ? JSON.stringify(v) : String(v);
}

// Application context as an object: the changes view gives it as JSON, row history as the
// JSON text it was stored as. Null when there is none or it is not an object.
function contextObject(context) {
  if (context === null || context === undefined || context === "") return null;
  if (typeof context === "object") return context;
  try { const c = JSON.parse(context); return c !== null && typeof c === "object" ? c : null; }
  catch { return null; }
}

function who(context) {
  const c = contextObject(context);
  if (!c) return context ? String(context) : "";
  return Object.entries(c).map(([k, v]) => k + "=" + text(v)).join(" ");
}

async function loadTables() {
  const body = await api("/api/tables");
  state.tables = body.tables;
  document.getElementById("position").textContent = "durable through " + body.position;
  const list = document.getElementById("tables");
  list.replaceChildren(...body.tables.map(t => el("li", {},
    el("button", { type: "button", "data-table": t.table, onclick: () => pick(t) },
      t.table, el("small", {}, t.changes + " changes")))));
  document.getElementById("scope").append(...body.tables.map(t => el("option", { value: t.table }, t.table)));
}

// Rows are found in the picked table; the changes list follows it too, until another table
// (or all of them) is chosen in its own filter.
function pick(t) {
  state.table = t;
  for (const b of document.querySelectorAll("nav button")) b.setAttribute("aria-current", String(b.dataset.table === t.table));
  document.getElementById("table-title").textContent = t.table + " (key: " + (t.primary_key.join(", ") || "none") + ")";
  const key = document.getElementById("key");
  key.disabled = false; document.getElementById("find-button").disabled = false;
  key.focus();
  document.getElementById("scope").value = t.table;
  loadChanges(true);
}

async function findRow(ev) {
  ev.preventDefault();
  show("");
  const t = state.table;
  const parts = document.getElementById("key").value.split(",").map(s => s.trim());
  const q = parts.map(p => "key=" + encodeURIComponent(p)).join("&");
  try {
    const body = await api("/api/tables/" + encodeURIComponent(t.table) + "/history?" + q);
    renderTimeline(body);
  } catch (e) { show(e.message); }
}

function renderTimeline(body) {
  const box = document.getElementById("timeline");
  document.getElementById("asof").replaceChildren();
  if (!body.versions.length) { box.replaceChildren(el("p", {}, "No change of this row is archived.")); return; }
  const items = body.versions.slice().reverse().map(v => {
    const changed = new Set(v.changed || []);
    const image = v.after || v.before || {};
    const cols = Object.keys(image);
    const row = el("tr", {}, ...cols.map(c => el("td", { class: changed.has(c) ? "changed" : "" }, text(image[c]))));
    const was = v.op === "update" && v.before
      ? el("tr", {}, ...cols.map(c => el("td", { class: changed.has(c) ? "was" : "" }, changed.has(c) ? text(v.before[c]) : "")))
      : null;
    return el("article", { class: "version", "data-op": v.op },
      el("header", {},
        el("span", { class: "op" }, v.op),
        el("time", {}, v.committed_at),
        el("span", { class: "who" }, who(v.context)),
        el("span", {}, "tx " + v.xid),
        el("button", { type: "button", class: "link", onclick: () => asOf(body.table, v.lsn, v.committed_at) }, "table as of this version")),
      el("table", {}, el("thead", {}, el("tr", {}, ...cols.map(c => el("th", {}, c)))), el("tbody", {}, row, was)));
  });
  box.replaceChildren(el("h2", {}, "History of " + body.table + " " + body.key.join(", ")), ...items);
}

function lsnText(n) {
  const big = BigInt(n);
  return (big >> 32n).toString(16).toUpperCase() + "/" + (big & 0xffffffffn).toString(16).toUpperCase();
}

async function asOf(table, lsn, at) {
  try {
    const body = await api("/api/tables/" + encodeURIComponent(table) + "/as_of?limit=200&at=" + encodeURIComponent(lsnText(lsn)));
    const cols = body.rows.length ? Object.keys(body.rows[0]) : [];
    document.getElementById("asof").replaceChildren(
      el("h2", {}, table + " as of " + at + " (LSN " + lsnText(lsn) + ")" + (body.next_offset ? ", first 200 rows" : "")),
      el("table", { id: "asof-table" }, el("thead", {}, el("tr", {}, ...cols.map(c => el("th", {}, c)))),
        el("tbody", {}, ...body.rows.map(r => el("tr", {}, ...cols.map(c => el("td", {}, text(r[c]))))))));
  } catch (e) { show(e.message); }
}

// The context filter as typed ("user_id=7"), or null.
function contextFilter() {
  const ctx = document.getElementById("context").value.trim();
  if (!ctx) return null;
  const [k, ...v] = ctx.split("=");
  return { field: k.trim(), value: v.join("=").trim() };
}

function changesQuery() {
  const p = new URLSearchParams();
  const scope = document.getElementById("scope").value;
  if (scope) p.append("table", scope);
  const ctx = contextFilter();
  if (ctx) p.append("context." + ctx.field, ctx.value);
  for (const f of ["since", "until"]) { const v = document.getElementById(f).value.trim(); if (v) p.append(f, v); }
  p.append("limit", "50");
  return p;
}

// Whether a live change belongs in the list as filtered (table and context; a live change is
// always newer than "since", and "until" is not applied to the live list).
function listed(c) {
  const scope = document.getElementById("scope").value;
  if (scope && scope !== c.schema + "." + c.table) return false;
  const ctx = contextFilter();
  if (!ctx) return true;
  const v = contextObject(c.context);
  return v !== null && ctx.field in v && text(v[ctx.field]) === ctx.value;
}

function changeRow(c, fresh) {
  const image = c.after || c.before || {};
  const changed = c.before && c.after ? Object.keys(c.after).filter(k => JSON.stringify(c.after[k]) !== JSON.stringify(c.before[k])) : Object.keys(image);
  return el("tr", { class: fresh ? "new" : "", "data-cursor": c.cursor },
    el("td", {}, c.committed_at), el("td", {}, c.schema + "." + c.table), el("td", {}, c.operation),
    el("td", {}, text(c.primary_key)), el("td", { class: "who" }, who(c.context)), el("td", {}, changed.join(", ")));
}

async function loadChanges(fresh, ev) {
  if (ev) ev.preventDefault();
  show("");
  const p = changesQuery();
  if (!fresh && state.next) p.append("after", state.next);
  try {
    const body = await api("/api/changes?" + p);
    const tbody = document.querySelector("#changes tbody");
    const rows = body.changes.map(c => changeRow(c, false));
    if (fresh) tbody.replaceChildren(...rows); else tbody.append(...rows);
    state.next = body.next;
    document.getElementById("more").hidden = !body.next;
  } catch (e) { show(e.message); }
}

// The live stream, read with fetch (an EventSource cannot send the token).
async function follow() {
  const controller = new AbortController();
  state.live = controller;
  const headers = state.token ? { Authorization: "Bearer " + state.token } : {};
  try {
    const r = await fetch("/api/stream?since=end", { headers, signal: controller.signal });
    if (!r.ok) throw new Error((await r.json()).error);
    const reader = r.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += value;
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, end); buffer = buffer.slice(end + 2);
        const data = event.split("\n").filter(l => l.startsWith("data:")).map(l => l.slice(5).trimStart()).join("\n");
        if (!event.includes("event: change") || !data) continue;
        const c = JSON.parse(data);
        if (!listed(c)) continue;
        document.querySelector("#changes tbody").prepend(changeRow(c, true));
        document.getElementById("position").textContent = "live: last change " + c.cursor;
      }
    }
  } catch (e) { if (e.name !== "AbortError") show("live stream: " + e.message); }
}

document.addEventListener("DOMContentLoaded", () => {
  document.getElementById("find").addEventListener("submit", findRow);
  document.getElementById("filter").addEventListener("submit", ev => loadChanges(true, ev));
  document.getElementById("more").addEventListener("click", () => loadChanges(false));
  document.getElementById("live").addEventListener("change", ev => {
    if (ev.target.checked) follow(); else if (state.live) state.live.abort();
  });
  loadTables().then(() => loadChanges(true)).catch(e => show(e.message));
});
