// The changerelay page: a live table of change events from /socket.
//
// Everything shown comes from the database, so the DOM is built with textContent only; the
// page's Content-Security-Policy forbids inline code, hence no handlers in the markup.

import { connect, DISCONNECTS } from "./changerelay.js";

const MAX_ROWS = 200;
const MAX_TEXT = 240;
const OPERATIONS = new Set([
  "insert", "update", "replace", "delete", "drop", "rename", "dropDatabase", "invalidate",
]);

const $ = (id) => document.getElementById(id);
const ui = {
  status: $("status"),
  statusText: $("status-text"),
  statusDetail: $("status-detail"),
  count: $("count"),
  countLabel: $("count-label"),
  rows: $("rows"),
  empty: $("empty"),
  resync: $("resync"),
  resyncText: $("resync-text"),
  error: $("error"),
  errorText: $("error-text"),
};

let received = 0;

// What the status line explains: why the last live connection ended, and how many attempts
// have failed since (a restart shows "1001 server going away", not the 1006s that follow it).
const connection = { open: false, everOpen: false, lastClose: null, failed: 0 };

// The page's own query (ns, ops, filter, access_token) selects what the socket streams.
const params = new URLSearchParams(location.search);
if (params.getAll("ns").length) {
  $("scope").textContent = params.getAll("ns").join(", ");
  $("scope").className = "namespaces";
}
$("cap").textContent = String(MAX_ROWS);

$("resync-dismiss").addEventListener("click", () => { ui.resync.hidden = true; });
$("resync-clear").addEventListener("click", () => {
  ui.rows.replaceChildren();
  ui.empty.hidden = false;
  ui.resync.hidden = true;
});
$("error-dismiss").addEventListener("click", () => { ui.error.hidden = true; });

connect(`/socket${location.search}`, {
  onChange(change) {
    console.log(change);
    received += 1;
    ui.count.textContent = received.toLocaleString("en");
    ui.countLabel.textContent = received === 1 ? "event" : "events";
    addRow(changeRow(change));
  },
  onControl(message) {
    console.log(message);
    if (message.type === "resync") {
      const reason = message.reason ?? "unknown reason";
      ui.resyncText.textContent =
        `The server could not replay every change (${reason}); rows older than the marker may be ` +
        "incomplete. Reload the data from the database if you need a complete picture.";
      ui.resync.hidden = false;
      addRow(gapRow(reason));
    } else if (message.type === "error") {
      ui.errorText.textContent = [message.code, message.message].filter(Boolean).join(": ");
      ui.error.hidden = false;
    }
  },
  onStatus: showStatus,
});

function showStatus(status) {
  if (status.state === "open") {
    Object.assign(connection, { open: true, everOpen: true, failed: 0 });
    ui.error.hidden = true; // in-band errors announce a close; a new connection supersedes them
    showDetail();
    setStatus("live", "Live");
  } else if (status.state === "connecting") {
    const again = connection.everOpen || status.attempt > 0;
    setStatus(again ? "reconnecting" : "connecting", again ? "Reconnecting…" : "Connecting…");
  } else {
    if (connection.open) {
      const why = status.reason || causeOf(status.code) || "no reason given";
      connection.lastClose = `last close: ${status.code} ${why} · ${clock(new Date())}`;
    } else {
      connection.failed += 1;
    }
    connection.open = false;
    showDetail();
    if (status.retryIn === null) setStatus("closed", "Closed");
    else setStatus("reconnecting", `Reconnecting in ${(status.retryIn / 1000).toFixed(1)} s`);
  }
}

/** A close code's cause in words, from the client's table (a reason, when sent, says more). */
function causeOf(code) {
  const [cause] = Object.entries(DISCONNECTS.closes).find(([, close]) => close.code === code) ?? [];
  return cause?.replaceAll("_", " ");
}

function showDetail() {
  const { lastClose, failed } = connection;
  const attempts = failed === 1 ? "1 failed attempt" : `${failed} failed attempts`;
  ui.statusDetail.textContent = [lastClose, failed ? attempts : null].filter(Boolean).join(" · ");
}

function setStatus(state, text) {
  ui.status.dataset.state = state;
  ui.statusText.textContent = text;
}

function addRow(row) {
  ui.rows.prepend(row);
  while (ui.rows.rows.length > MAX_ROWS) ui.rows.lastElementChild.remove();
  ui.empty.hidden = true;
}

function changeRow(change) {
  const op = String(change.operationType);
  const row = element("tr", { className: "change" });
  row.dataset.op = op;
  if (typeof change._id?._data === "string") row.dataset.id = change._id._data;
  row.append(
    timeCell(change.wallTime),
    cell(element("span", { className: `op op-${OPERATIONS.has(op) ? op : "other"}`, text: op })),
    cell(element("code", { text: namespace(change.ns) })),
    cell(clipped("code", change.documentKey === undefined ? "—" : keyText(change.documentKey))),
    cell(...details(change)),
  );
  return row;
}

function gapRow(reason) {
  const row = element("tr", { className: "gap" });
  const td = cell(`Changes may be missing before this point (${reason})`);
  td.colSpan = 5;
  row.append(td);
  return row;
}

function timeCell(wallTime) {
  const date = wallDate(wallTime);
  const when = date ?? new Date();
  const time = element("time", { text: clock(when) });
  time.dateTime = when.toISOString();
  time.title = date ? when.toString() : `received ${when.toString()} (the event has no wallTime)`;
  if (!date) time.className = "received";
  return cell(time);
}

function details(change) {
  switch (change.operationType) {
    case "insert":
    case "replace":
      return change.fullDocument
        ? [clipped("code", compact(withoutId(change.fullDocument)))]
        : [muted("no fullDocument")];
    case "update":
      return updateParts(change.updateDescription ?? {});
    case "delete":
      return change.fullDocumentBeforeChange
        ? [muted("before "), clipped("code", compact(withoutId(change.fullDocumentBeforeChange)))]
        : [muted("document removed")];
    case "rename":
      return [muted("renamed to "), element("code", { text: namespace(change.to) })];
    case "drop":
      return [muted("collection dropped")];
    case "dropDatabase":
      return [muted("database dropped")];
    case "invalidate":
      return [muted("change stream invalidated")];
    default:
      return change.operationDescription
        ? [clipped("code", compact(change.operationDescription))]
        : [];
  }
}

function updateParts({ updatedFields = {}, removedFields = [], truncatedArrays = [] }) {
  const parts = [];
  for (const [path, value] of Object.entries(updatedFields)) {
    const part = element("span", { className: "field field-set" });
    part.append(element("code", { text: path }), " = ", clipped("code", compact(value)));
    parts.push(part);
  }
  for (const path of removedFields) {
    const part = element("span", { className: "field field-unset" });
    part.append("unset ", element("code", { text: path }));
    parts.push(part);
  }
  for (const { field, newSize } of truncatedArrays) {
    const part = element("span", { className: "field field-truncated" });
    part.append(element("code", { text: field }), ` truncated to ${newSize}`);
    parts.push(part);
  }
  return parts.length ? parts : [muted("no field changes")];
}

// -- Extended JSON, compactly: the shell's notation, which people read faster than raw $-keys.

function compact(value) {
  if (value === null || typeof value !== "object") return JSON.stringify(value) ?? String(value);
  if (Array.isArray(value)) return `[${value.map(compact).join(", ")}]`;
  const wrapped = extendedJson(value);
  if (wrapped !== undefined) return wrapped;
  const fields = Object.entries(value).map(([key, item]) => `${fieldName(key)}: ${compact(item)}`);
  return `{${fields.join(", ")}}`;
}

function extendedJson(value) {
  const keys = Object.keys(value);
  if (keys.length !== 1 || !keys[0].startsWith("$")) return undefined;
  const inner = value[keys[0]];
  switch (keys[0]) {
    case "$oid": return `ObjectId("${inner}")`;
    case "$date": {
      const date = wallDate(value);
      return date ? `ISODate("${date.toISOString()}")` : undefined;
    }
    case "$numberLong":
    case "$numberInt":
    case "$numberDouble": return String(inner);
    case "$numberDecimal": return `Decimal128("${inner}")`;
    case "$timestamp": return `Timestamp({t: ${inner.t}, i: ${inner.i}})`;
    case "$binary": return `Binary("${inner.base64}", ${Number.parseInt(inner.subType, 16)})`;
    case "$regularExpression": return `/${inner.pattern}/${inner.options}`;
    case "$minKey": return "MinKey()";
    case "$maxKey": return "MaxKey()";
    default: return undefined;
  }
}

function keyText(documentKey) {
  const keys = Object.keys(documentKey ?? {});
  return keys.length === 1 && keys[0] === "_id" ? compact(documentKey._id) : compact(documentKey);
}

function withoutId(document) {
  if (typeof document !== "object" || Array.isArray(document)) return document;
  const { _id, ...rest } = document;
  return rest;
}

function fieldName(key) {
  return /^[A-Za-z_$][\w$]*$/.test(key) ? key : JSON.stringify(key);
}

function namespace(ns) {
  if (!ns) return "—";
  return ns.coll === undefined ? String(ns.db) : `${ns.db}.${ns.coll}`;
}

function wallDate(wallTime) {
  const raw = wallTime?.$date;
  const millis = typeof raw === "object" && raw !== null ? Number(raw.$numberLong) : raw;
  if (millis === undefined) return null;
  const date = new Date(millis);
  return Number.isNaN(date.getTime()) ? null : date;
}

function clock(date) {
  const hms = date.toLocaleTimeString("en-GB", { hour12: false });
  return `${hms}.${String(date.getMilliseconds()).padStart(3, "0")}`;
}

// -- DOM helpers

function element(tag, { className, text } = {}) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function cell(...children) {
  const td = document.createElement("td");
  td.append(...children);
  return td;
}

function muted(text) {
  return element("span", { className: "muted", text });
}

/** Long values are cut for the table; the full text stays available as a tooltip. */
function clipped(tag, text) {
  const node = element(tag, { text: text.length > MAX_TEXT ? `${text.slice(0, MAX_TEXT)}…` : text });
  if (text.length > MAX_TEXT) node.title = text.slice(0, 10_000);
  return node;
}
