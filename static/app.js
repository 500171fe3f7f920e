// The changerelay page: the change events of one subscription as a live table, the
// subscription (namespaces, operations, filter) editable in place, every event one click away.
// With `?live=db.coll[&filter=…]` it shows the current documents of that collection instead
// (a live query, live.js), kept up to date.
//
// The page's Content-Security-Policy forbids inline code, hence no handlers in the markup; what
// comes from the database is shown with textContent only (render.js).

import { connect, DISCONNECTS, eventId, liveQuery } from "./changerelay.js";
import { liveTable } from "./live.js";
import { changeRow, clock, element, gapRow, namespace, OPERATIONS } from "./render.js";

const MAX_ROWS = 200;
const RATE_WINDOW = 5; // seconds the events/s figure averages over
// How each state of MongoDB reads after "MongoDB "; a state this page predates reads as itself.
const SOURCE_STATES = {
  open: "open",
  connecting: "connecting",
  unreachable: "unreachable",
  not_replica_set: "is not a replica set",
  auth_failed: "refused the relay's credentials",
};

const $ = (id) => document.getElementById(id);
const ui = {
  status: $("status"),
  statusText: $("status-text"),
  statusDetail: $("status-detail"),
  source: $("source"),
  sourcePart: $("source-part"),
  count: $("count"),
  countLabel: $("count-label"),
  rate: $("rate"),
  opCounts: $("op-counts"),
  rows: $("rows"),
  empty: $("empty"),
  pause: $("pause"),
  held: $("held"),
  resync: $("resync"),
  resyncText: $("resync-text"),
  error: $("error"),
  errorText: $("error-text"),
  form: $("subscription"),
  ns: $("sub-ns"),
  ops: $("sub-ops"),
  filter: $("sub-filter"),
  live: $("sub-live"),
  eventsView: $("events-view"),
  liveView: $("live-view"),
  documentsNs: $("documents-ns"),
  refusal: $("refusal"),
  subscribed: $("subscribed"),
  detail: $("detail"),
  detailTitle: $("detail-title"),
  detailId: $("detail-id"),
  detailJson: $("detail-json"),
  copied: $("copied"),
};

// What the table shows, and what it holds back while paused (counted, newest MAX_ROWS kept).
const view = { paused: false, held: [], heldCount: 0, received: 0, perOperation: new Map() };
const events = new WeakMap(); // row → the change event it shows
const rate = { started: Date.now(), seconds: new Map() }; // epoch second → events received

// The status line: the socket's state, and why the last live connection ended and how many
// attempts failed since (a restart shows "1001 server shutting down", not the 1006s after it).
const connection = {
  state: "connecting", everOpen: false, lastClose: null, failed: 0, retryIn: null, refusal: null,
};
let source = null; // MongoDB's state as the relay last told it: {state, message, since}

let relay = null;
let generation = 0; // callbacks of a replaced connection are ignored
let liveMode = false; // the page shows a live query's documents, not change events
const documents = liveTable({
  rows: $("documents-rows"),
  count: $("documents-count"),
  label: $("documents-label"),
  capped: $("documents-capped"),
  empty: $("documents-empty"),
});

$("cap").textContent = String(MAX_ROWS);
const pageQuery = new URLSearchParams(location.search);
fillForm(pageQuery);
showSubscription(pageQuery);
subscribe(location.search); // the page's own query, byte for byte, selects the first stream

// -- the connection ------------------------------------------------------------------------

function subscribe(search) {
  const mine = ++generation;
  const current = (callback) => (...values) => {
    if (mine === generation) callback(...values);
  };
  relay?.close();
  Object.assign(connection, { state: "connecting", everOpen: false, lastClose: null, failed: 0,
    refusal: null });
  source = null;
  const common = {
    onControl: current(control),
    onStatus: current(showStatus),
    onSource: current(showSource),
  };
  const collection = new URLSearchParams(search).get("live");
  showMode(collection);
  if (collection === null) {
    relay = connect(`/socket${search}`, { ...common, onChange: current(receive) });
    return;
  }
  documents.loading();
  relay = liveQuery(`/socket${liveSearch(search)}`, {
    ...common,
    onSnapshot: current((all) => documents.snapshot(all)),
    onChange: current((change, all) => {
      console.log(change.message);
      if ("operationType" in change.message) count(change.message);
      documents.change(change, all);
    }),
  });
}

/** The socket's query for a live table: `live=db.coll` asks for `ns=db.coll`; the rest of the
 * page's query is kept byte for byte (liveQuery adds `snapshot=1`). */
function liveSearch(search) {
  const parts = search.slice(1).split("&").filter(Boolean)
    .map((part) => (part.startsWith("live=") ? `ns=${part.slice("live=".length)}` : part));
  return `?${parts.join("&")}`;
}

/** Show the change-events table, or the live table of `collection` (null: events). */
function showMode(collection) {
  liveMode = collection !== null;
  ui.eventsView.hidden = liveMode;
  ui.liveView.hidden = !liveMode;
  ui.documentsNs.textContent = collection ?? "";
  ui.resync.hidden = true;
}

function receive(change) {
  console.log(change);
  count(change);
  if (view.paused) {
    hold({ change });
  } else {
    addRow(changeRow(change), change);
  }
}

function control(message) {
  console.log(message);
  const restarts = message.type === "resync" || message.code === "live_query_gap";
  if (restarts && liveMode) {
    return; // the live query loads the documents again by itself
  } else if (message.type === "resync") {
    const reason = message.reason ?? "unknown reason";
    ui.resyncText.textContent =
      `The server could not replay every change (${reason}); rows older than the marker may be ` +
      "incomplete. Reload the data from the database if you need a complete picture.";
    ui.resync.hidden = false;
    if (view.paused) hold({ gap: reason });
    else addRow(gapRow(reason));
  } else if (message.type === "error") {
    ui.errorText.textContent = [message.code, message.message].filter(Boolean).join(": ");
    ui.error.hidden = false;
  }
}

function showSource(told) {
  source = told;
  renderStatus();
}

function showStatus(status) {
  if (status.state === "open") {
    Object.assign(connection, { state: "open", everOpen: true, failed: 0, refusal: null });
    source = { state: "open", message: "", since: null }; // the relay says when it is not
    ui.error.hidden = true; // in-band errors announce a close; a new connection supersedes them
    ui.refusal.hidden = true;
  } else if (status.state === "connecting") {
    connection.state = connection.everOpen || status.attempt > 0 ? "reconnecting" : "connecting";
    connection.retryIn = null;
  } else {
    if (connection.state === "open") {
      const why = status.reason || causeOf(status.code) || "no reason given";
      connection.lastClose = `last close: ${status.code} ${why} · ${clock(new Date())}`;
    } else {
      connection.failed += 1;
    }
    source = null; // unknown until the relay says again
    connection.refusal = status.refusal ?? null;
    connection.retryIn = status.retryIn;
    connection.state = status.retryIn === null ? "stopped" : "waiting";
    if (status.retryIn === null && status.refusal) showRefusal(status.refusal);
  }
  renderStatus();
}

/** A close code's cause in words, from the client's table (a reason, when sent, says more). */
function causeOf(code) {
  const causes = Object.entries(DISCONNECTS.closes);
  const [cause] = causes.find(([, close]) => close.code === code) ?? [];
  return cause?.replaceAll("_", " ");
}

function renderStatus() {
  const { state, lastClose, failed, retryIn, refusal } = connection;
  const healthy = source === null || source.state === "open";
  const text = {
    open: healthy ? "Live" : "Connected to the relay",
    connecting: "Connecting…",
    reconnecting: "Reconnecting…",
    waiting: `Reconnecting in ${((retryIn ?? 0) / 1000).toFixed(1)} s`,
    stopped: refusal ? "Refused by the relay" : "Stopped",
  }[state];
  ui.status.dataset.state = state === "open" ? "live" : state;
  ui.status.dataset.source = source?.state ?? "unknown";
  ui.statusText.textContent = text;

  ui.sourcePart.hidden = source === null;
  if (source !== null) {
    const since = source.since ? ` since ${source.since.toLocaleTimeString("en-GB")}` : "";
    const label = SOURCE_STATES[source.state] ?? source.state.replaceAll("_", " ");
    ui.source.textContent = `MongoDB ${label}${healthy ? "" : `${since} — retrying`}`;
    ui.source.title = source.message;
  }
  const attempts = failed === 1 ? "1 failed attempt" : `${failed} failed attempts`;
  const refused = refusal && state !== "stopped" ? refusalText(refusal) : null;
  ui.statusDetail.textContent = [lastClose, failed ? attempts : null, refused]
    .filter(Boolean).join(" · ");
}

function refusalText({ status, error, message }) {
  return `refused (${[status, error].filter(Boolean).join(" ")}): ${message}`;
}

/** A refusal retrying cannot cure, next to the subscription that is likely to be its cause. */
function showRefusal(refusal) {
  ui.refusal.replaceChildren(
    element("strong", { text: "The relay refused this subscription: " }),
    refusal.message,
    " ",
    element("code", { text: `(${[refusal.status, refusal.error].filter(Boolean).join(" ")})` }),
  );
  ui.refusal.hidden = false;
}

// -- the subscription form -------------------------------------------------------------------

ui.form.addEventListener("submit", (event) => {
  event.preventDefault();
  const query = formQuery();
  const search = query ? `?${query}` : "";
  history.replaceState(null, "", `${location.pathname}${search}`); // a reload keeps it
  showSubscription(new URLSearchParams(query));
  ui.refusal.hidden = true;
  subscribe(search);
});

$("sub-reset").addEventListener("click", () => {
  fillForm(new URLSearchParams());
  ui.form.requestSubmit();
});

function fillForm(query) {
  ui.live.checked = query.has("live");
  ui.ns.value = query.get("live") ?? query.get("ns") ?? "";
  ui.filter.value = query.get("filter") ?? "";
  const ticked = new Set((query.get("ops") ?? "").split(",").map((op) => op.trim()));
  const choices = [...new Set([...OPERATIONS, ...ticked])].filter(Boolean);
  ui.ops.querySelectorAll("label").forEach((label) => label.remove());
  for (const op of choices) {
    const box = element("input");
    box.type = "checkbox";
    box.name = "ops";
    box.value = op;
    box.checked = ticked.has(op);
    const label = element("label", { className: "op-choice" });
    label.append(box, ` ${op}`);
    ui.ops.append(label);
  }
  ui.ops.disabled = ui.live.checked;
}

ui.live.addEventListener("change", () => { ui.ops.disabled = ui.live.checked; });

/** The query the form describes; a token given to the page goes along. */
function formQuery() {
  const query = new URLSearchParams();
  const ns = ui.ns.value.trim();
  const ops = [...ui.ops.querySelectorAll("input:checked")].map((box) => box.value);
  const filter = ui.filter.value.trim();
  if (ui.live.checked) query.set("live", ns); // one collection; every operation
  else if (ns) query.set("ns", ns);
  if (ops.length && !ui.live.checked) query.set("ops", ops.join(","));
  if (filter) query.set("filter", filter);
  if (pageQuery.has("access_token")) query.set("access_token", pageQuery.get("access_token"));
  return query.toString();
}

function showSubscription(query) {
  const parts = [["live", "the documents of"], ["ns", "namespaces"], ["ops", "operations"],
    ["filter", "filter"]]
    .filter(([name]) => query.has(name))
    .map(([name, words]) => [`${words} `, element("code", { text: query.get(name) })]);
  ui.subscribed.replaceChildren(
    ...(parts.length ? parts.flatMap((part, i) => (i ? [" · ", ...part] : part))
      : ["everything watched"]),
  );
}

// -- the table: rows, pause, clear, counts ---------------------------------------------------

function addRow(row, change) {
  if (change) events.set(row, change);
  ui.rows.prepend(row);
  while (ui.rows.rows.length > MAX_ROWS) ui.rows.lastElementChild.remove();
  ui.empty.hidden = true;
}

function hold(item) {
  view.held.push(item);
  if (view.held.length > MAX_ROWS) view.held.shift(); // it would scroll out of the table anyway
  if (item.change) view.heldCount += 1;
  showHeld();
}

function showHeld() {
  ui.held.hidden = !view.paused;
  const n = view.heldCount;
  ui.held.textContent = `Paused · ${n.toLocaleString("en")} ${n === 1 ? "event" : "events"} ` +
    "held back";
}

ui.pause.addEventListener("click", () => {
  view.paused = !view.paused;
  ui.pause.setAttribute("aria-pressed", String(view.paused));
  ui.pause.textContent = view.paused ? "Resume" : "Pause";
  if (!view.paused) {
    for (const item of view.held.splice(0)) {
      if (item.change) addRow(changeRow(item.change), item.change);
      else addRow(gapRow(item.gap));
    }
    view.heldCount = 0;
  }
  showHeld();
});

function clear() {
  ui.rows.replaceChildren();
  view.held.length = 0;
  view.heldCount = 0;
  view.received = 0;
  view.perOperation.clear();
  ui.opCounts.replaceChildren();
  ui.count.textContent = "0";
  ui.countLabel.textContent = "events";
  ui.empty.hidden = false;
  ui.resync.hidden = true;
  showHeld();
}

$("clear").addEventListener("click", clear);
$("resync-clear").addEventListener("click", clear);
$("resync-dismiss").addEventListener("click", () => { ui.resync.hidden = true; });
$("error-dismiss").addEventListener("click", () => { ui.error.hidden = true; });

function count(change) {
  view.received += 1;
  ui.count.textContent = view.received.toLocaleString("en");
  ui.countLabel.textContent = view.received === 1 ? "event" : "events";

  const op = String(change.operationType);
  const seen = (view.perOperation.get(op) ?? 0) + 1;
  view.perOperation.set(op, seen);
  let item = ui.opCounts.querySelector(`li[data-op="${CSS.escape(op)}"]`);
  if (!item) {
    item = element("li");
    item.dataset.op = op;
    const known = OPERATIONS.includes(op) ? op : "other";
    item.append(element("span", { className: `op op-${known}`, text: op }), " ",
      element("span", { className: "figure" }));
    ui.opCounts.append(item);
  }
  item.lastElementChild.textContent = seen.toLocaleString("en");

  const second = Math.floor(Date.now() / 1000);
  rate.seconds.set(second, (rate.seconds.get(second) ?? 0) + 1);
}

// Events per second over the last whole seconds (fewer while the page is younger than that).
setInterval(() => {
  const now = Math.floor(Date.now() / 1000);
  let total = 0;
  for (const [second, n] of rate.seconds) {
    if (second < now - RATE_WINDOW) rate.seconds.delete(second);
    else if (second < now) total += n;
  }
  const span = Math.min(RATE_WINDOW, Math.max(1, now - Math.floor(rate.started / 1000)));
  const perSecond = total / span;
  ui.rate.textContent = perSecond < 10 ? perSecond.toFixed(1) : Math.round(perSecond)
    .toLocaleString("en");
}, 1000);

// -- the whole event -------------------------------------------------------------------------

let opener = null; // the row to return focus to when the detail view closes

ui.rows.addEventListener("click", (event) => {
  const row = event.target.closest("tr.change");
  if (row && !getSelection()?.toString()) showEvent(row); // selecting text is not a click
});

ui.rows.addEventListener("keydown", (event) => {
  if ((event.key === "Enter" || event.key === " ") && event.target.matches("tr.change")) {
    event.preventDefault(); // Space would scroll
    showEvent(event.target);
  }
});

function showEvent(row) {
  const change = events.get(row);
  if (!change) return;
  opener = row;
  ui.detailTitle.textContent = `${change.operationType} · ${namespace(change.ns)}`;
  ui.detailId.textContent = eventId(change) ?? "—";
  ui.detailJson.textContent = JSON.stringify(change, null, 2);
  ui.copied.textContent = "";
  ui.detail.showModal();
}

ui.detail.addEventListener("close", () => {
  if (opener?.isConnected) opener.focus();
  opener = null;
});
$("detail-close").addEventListener("click", () => ui.detail.close());
ui.detail.addEventListener("click", (event) => {
  if (event.target === ui.detail) ui.detail.close(); // the backdrop
});
$("copy-event").addEventListener("click", () => copy(ui.detailJson, "the event"));
$("copy-id").addEventListener("click", () => copy(ui.detailId, "the id"));

/** Copy an element's text; where the clipboard is unavailable (plain http), select it. */
async function copy(node, what) {
  try {
    await navigator.clipboard.writeText(node.textContent);
    ui.copied.textContent = `Copied ${what}`;
  } catch {
    getSelection().selectAllChildren(node);
    ui.copied.textContent = `Selected ${what}: press Ctrl+C (⌘C) to copy`;
  }
}
