// How a change event looks on the page: a table row (a card on narrow screens) whose cells say
// what changed, in the shell's notation for Extended JSON.
//
// Everything shown comes from the database, so the DOM is built with textContent only.

import { eventId } from "./changerelay.js";

/** Operation types with a colour of their own; others are shown too, in a neutral one. */
export const OPERATIONS = [
  "insert", "update", "replace", "delete", "drop", "rename", "dropDatabase", "invalidate",
];
const KNOWN = new Set(OPERATIONS);
const MAX_TEXT = 240;
const COLUMNS = ["Time", "Operation", "Namespace", "Document key", "Change"];

/**
 * The row of one change event. It is focusable: the page opens the whole event from it.
 *
 * Rows and cells name their roles: a table restyled as cards (display: grid) loses its table
 * semantics in some browsers otherwise.
 */
export function changeRow(change) {
  const op = String(change.operationType);
  const row = element("tr", { className: "change" });
  row.setAttribute("role", "row");
  row.tabIndex = 0;
  row.dataset.op = op;
  const id = eventId(change);
  if (id !== null) row.dataset.id = id;
  const key = change.documentKey === undefined ? null : keyText(change.documentKey);
  const cells = [
    timeCell(change.wallTime),
    cell(element("span", { className: `op op-${KNOWN.has(op) ? op : "other"}`, text: op })),
    cell(element("code", { text: namespace(change.ns) })),
    cell(key === null ? "—" : clipped("code", key)),
    cell(...details(change)),
  ];
  cells.forEach((td, index) => {
    td.dataset.label = COLUMNS[index];
    td.className = `cell-${["time", "op", "ns", "key", "change"][index]}`;
  });
  if (key === null) cells[3].classList.add("none"); // a card leaves out what there is not
  row.append(...cells);
  return row;
}

/**
 * The row of one document of a live query, keyed by its `_id` ({@link idKey}): its cells are
 * refilled in place when the document changes ({@link fillDocumentRow}).
 */
export function documentRow(key, document) {
  const row = element("tr", { className: "doc" });
  row.setAttribute("role", "row");
  row.dataset.key = key;
  fillDocumentRow(row, document);
  return row;
}

/** Show `document` in its row: the `_id`, and the rest of the document. */
export function fillDocumentRow(row, document) {
  const id = cell(clipped("code", compact(document?._id)));
  id.className = "cell-id";
  id.dataset.label = "_id";
  const rest = cell(clipped("code", compact(withoutId(document))));
  rest.className = "cell-doc";
  rest.dataset.label = "Document";
  row.replaceChildren(id, rest);
}

/** The marker of a gap: events before it may be missing (a resync). */
export function gapRow(reason) {
  const row = element("tr", { className: "gap" });
  row.setAttribute("role", "row");
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
    const part = element("span", { className: "part part-set" });
    part.append(element("code", { text: path }), " = ", clipped("code", compact(value)));
    parts.push(part);
  }
  for (const path of removedFields) {
    const part = element("span", { className: "part part-unset" });
    part.append("unset ", element("code", { text: path }));
    parts.push(part);
  }
  for (const { field, newSize } of truncatedArrays) {
    const part = element("span", { className: "part part-truncated" });
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
  if (document === null || typeof document !== "object" || Array.isArray(document)) {
    return document;
  }
  const { _id, ...rest } = document;
  return rest;
}

function fieldName(key) {
  return /^[A-Za-z_$][\w$]*$/.test(key) ? key : JSON.stringify(key);
}

/** `db.coll` (or `db`) of an event's `ns`; a dash when it has none. */
export function namespace(ns) {
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

/** HH:MM:SS.mmm, the precision a stream of changes needs. */
export function clock(date) {
  const hms = date.toLocaleTimeString("en-GB", { hour12: false });
  return `${hms}.${String(date.getMilliseconds()).padStart(3, "0")}`;
}

// -- DOM helpers

export function element(tag, { className, text } = {}) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function cell(...children) {
  const td = document.createElement("td");
  td.setAttribute("role", "cell");
  td.append(...children);
  return td;
}

function muted(text) {
  return element("span", { className: "muted", text });
}

/** Long values are cut for the table; the full text stays available as a tooltip. */
function clipped(tag, text) {
  const long = text.length > MAX_TEXT;
  const node = element(tag, { text: long ? `${text.slice(0, MAX_TEXT)}…` : text });
  if (long) node.title = text.slice(0, 10_000);
  return node;
}
