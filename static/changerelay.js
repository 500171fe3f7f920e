/**
 * changerelay browser client: follow a MongoDB change stream relayed over a WebSocket.
 *
 * The relay sends one JSON object per text frame: either a MongoDB change event (it has
 * `operationType`) or a control message (it has `type`). Connections drop – deploys, slow
 * consumers, flaky networks – so this client reconnects by itself and asks the server to
 * resume after the newest event it has seen, which makes a drop invisible except for latency.
 * When the relay refuses the connection it learns why and stops if retrying cannot help.
 *
 * ```js
 * import { connect } from "/static/changerelay.js";
 *
 * const relay = connect("/socket?ns=shop.orders", {
 *   onChange: (change) => console.log(change.operationType, change.documentKey),
 *   onControl: (message) => { if (message.type === "resync") reloadEverything(); },
 *   onStatus: (status) => console.log(status.state, status.code ?? ""),
 *   onSource: (source) => console.log("MongoDB", source.state, source.message),
 * });
 * // later: relay.close();
 * ```
 *
 * {@link liveQuery} keeps the current documents of one collection instead: a snapshot, then
 * every change after it, on the same reconnecting connection.
 *
 * No dependencies, no globals; works in any browser with ES modules and `WebSocket`.
 *
 * @module changerelay
 */

/** Backoff before the first retry is drawn from [0, BASE_DELAY) ms, doubling per failure. */
const BASE_DELAY = 500;
/** No retry waits longer than this, however many attempts have failed. */
const MAX_DELAY = 30_000;
/** A connection that stayed open this long counts as healthy: the backoff starts over. */
const STABLE_AFTER = 10_000;
/** How long to wait for the relay to say why a handshake failed before retrying anyway. */
const PROBE_TIMEOUT = 10_000;

/**
 * Every close code and handshake refusal the relay uses, and what this client does after it:
 * the same table as the relay's `changerelay/disconnect.py` and its README (the relay's tests
 * check that the three agree; it is written as JSON so that they can read it).
 *
 * `closes`: cause → the close code, the reason the relay sends with it (`null`: the reason
 * names the fault each time) and the retry policy. `refusals`: the HTTP status of a refused
 * handshake → the retry policy. The policies:
 *
 * - `no`: the same request fails again; stop, and report why.
 * - `backoff`: temporary; try the same request again after an exponential backoff.
 * - `resume`: reconnect after the backoff, resuming after the last id; nothing is lost.
 * - `fresh_token`: only with a new token — a URL function and `refreshable: true`; else stop.
 */
export const DISCONNECTS = {
  "closes": {
    "ping_timeout": {"code": 1000, "reason": "ping timed out", "retry": "resume"},
    "shutdown": {"code": 1001, "reason": "server shutting down", "retry": "resume"},
    "protocol_error": {"code": 1002, "reason": null, "retry": "resume"},
    "connection_lost": {"code": 1006, "reason": null, "retry": "resume"},
    "invalid_data": {"code": 1007, "reason": null, "retry": "resume"},
    "token_expired": {"code": 1008, "reason": "token expired", "retry": "fresh_token"},
    "too_many_frames": {"code": 1008, "reason": "too many frames", "retry": "resume"},
    "message_too_big": {"code": 1009, "reason": null, "retry": "resume"},
    "server_error": {"code": 1011, "reason": null, "retry": "resume"},
    "internal_error": {"code": 1011, "reason": "internal error", "retry": "resume"},
    "slow_consumer": {"code": 1013, "reason": "slow consumer", "retry": "resume"}
  },
  "refusals": {
    "400": "no", "401": "fresh_token", "403": "no", "404": "no", "408": "backoff", "413": "no",
    "414": "no", "421": "no", "426": "no", "429": "backoff", "431": "no", "503": "backoff"
  }
};

/**
 * A MongoDB change event in relaxed Extended JSON, exactly as the server produced it.
 *
 * @typedef {object} ChangeEvent
 * @property {string} operationType `insert`, `update`, `replace`, `delete`, `drop`, `rename`,
 *   `dropDatabase`, `invalidate`, or a newer type – treat unknown ones gracefully.
 * @property {{_data: string, _typeBits?: {$binary: {base64: string, subType: string}}}} _id
 *   The resume token; {@link eventId} makes it this event's id.
 * @property {{db: string, coll?: string}} [ns] The namespace the change happened in.
 * @property {object} [documentKey] `_id` (and the shard key, if any) of the changed document.
 * @property {object|null} [fullDocument] The document after the change, when available.
 * @property {{updatedFields: object, removedFields: string[], truncatedArrays: object[]}}
 *   [updateDescription] What an `update` changed.
 * @property {{db: string, coll: string}} [to] The new namespace of a `rename`.
 * @property {{$date: string|object}} [wallTime] Server wall-clock time of the change.
 * @property {{$timestamp: {t: number, i: number}}} [clusterTime] Oplog time of the change.
 */

/**
 * A control message from the server (it has `type` and no `operationType`).
 *
 * - `{type: "resync", reason}`: events were lost (e.g. `history_lost`: the resume point fell
 *   off the oplog). Reload your state from the database; the stream continues from now.
 * - `{type: "position", resume_after}`: a newer resume point on a quiet stream.
 * - `{type: "ready", resume_after, snapshot?}`: sent once per connection, when its live feed is
 *   attached (after any replay or catch-up): from then on every write it may see reaches it.
 *   Its `resume_after` becomes the resume point; it is passed to `onReady` too.
 * - `{type: "doc", ns, doc}`, `{type: "leave", ns, documentKey}`, `{type: "reset"}`: a live
 *   query's snapshot and the documents leaving its set ({@link liveQuery} reads them; a plain
 *   connection never asks for them).
 * - `{type: "error", code, message}`: the server reports a problem.
 * - `{type: "source", state, message, since}`: MongoDB's state as the relay sees it — `open`,
 *   `connecting`, `unreachable`, `not_replica_set`, `auth_failed`, or a newer one — sent when it
 *   changes and on connecting while it is not open; `message` is written for people, `since` is
 *   an ISO time. The socket stays open meanwhile: the relay keeps retrying MongoDB. It is
 *   passed to `onSource` too ({@link Source}).
 *
 * The client itself emits `{type: "error", code: "invalid_message", message}` when a frame is
 * not a JSON object, so a misbehaving proxy does not go unnoticed.
 *
 * @typedef {object} ControlMessage
 * @property {string} type
 */

/**
 * Connection state changes.
 *
 * - `{state: "connecting", url, attempt}`: a socket is being opened (`attempt` 0 is the first).
 * - `{state: "open", url}`: connected; events flow.
 * - `{state: "closed", code, reason, wasClean, retryIn, refusal}`: the socket closed.
 *   `retryIn` is the delay in ms before the next attempt, or `null` when none follows: after
 *   {@link Relay#close}, or when retrying cannot help ({@link DISCONNECTS}). `refusal` is set
 *   when the relay refused the handshake.
 *
 * A browser reports every failed handshake as 1006 with no details, so after a 1006 from a
 * socket that never opened the client fetches the same URL over HTTP: the relay runs the same
 * admission and answers its refusal as JSON (or 204, admitted: the failure was the network's).
 *
 * @typedef {object} Status
 * @property {"connecting"|"open"|"closed"} state
 * @property {Refusal} [refusal]
 */

/**
 * MongoDB's state as the relay sees it, apart from the socket's: the socket can be open while
 * MongoDB is away (the relay keeps its clients and retries).
 *
 * @typedef {object} Source
 * @property {string} state `open`, `connecting`, `unreachable`, `not_replica_set`,
 *   `auth_failed`, `unauthorized`, `error`, `images_missing`, `event_too_large`, or a newer one.
 * @property {string} message What is wrong and what happens next, written for people ("" when
 *   open and the relay has not said).
 * @property {Date|null} since When the relay entered the state (null when not told).
 */

/**
 * Why the relay refused a handshake.
 *
 * @typedef {object} Refusal
 * @property {number} status The HTTP status: 400 bad request, 401 token, 403 forbidden, 429 and
 *   503 connection caps, … (see {@link DISCONNECTS}).
 * @property {string|null} error The relay's error code, e.g. `invalid_filter`.
 * @property {string} message What is wrong and how to fix it, written for people.
 */

/**
 * @typedef {object} ConnectOptions
 * @property {(change: ChangeEvent) => void} [onChange] Called for every change event, in order.
 * @property {(message: ControlMessage) => void} [onControl] Called for control messages.
 * @property {(status: Status) => void} [onStatus] Called on every connection state change.
 * @property {(ready: ControlMessage) => void} [onReady] Called once per connection with its
 *   `ready` message, when every write it may see from then on reaches it.
 * @property {(source: Source) => void} [onSource] Called when MongoDB's state changes: for
 *   every `source` message, and with `{state: "open"}` when a connection opens after one was
 *   told otherwise (the relay tells a new connection only when MongoDB is not open).
 * @property {string|null} [resumeAfter] Resume after this event id ({@link eventId}) instead
 *   of starting from now, e.g. an id saved from a previous page load.
 * @property {boolean} [refreshable=false] The URL function puts a freshly issued token in every
 *   URL it returns, so a 401 or an expired token is worth another attempt.
 * @property {number} [baseDelay=500] Backoff base in ms.
 * @property {number} [maxDelay=30000] Backoff cap in ms.
 * @property {number} [stableAfter=10000] Open this long (ms) and the backoff resets.
 */

/**
 * The handle {@link connect} returns.
 *
 * @typedef {object} Relay
 * @property {() => void} close Close the socket for good; no reconnects follow.
 * @property {() => void} restart Forget the resume point and connect again (after the backoff,
 *   so a relay that asks for it on every connection cannot make a loop of it): the relay starts
 *   this client over from now, and a live query gets a fresh snapshot.
 * @property {string|null} lastId The newest event id or position the client holds: what it
 *   will send as `resume_after` when it reconnects. Save it to resume across page loads.
 */

/**
 * Open a relay connection that keeps itself open.
 *
 * After a close or a refused handshake it does what {@link DISCONNECTS} says: usually it
 * reconnects after an exponential backoff with full jitter (a random delay in
 * [0, min(maxDelay, baseDelay · 2^failures)) ms), adding `resume_after=<lastId>` to the URL so
 * the server replays exactly the events missed; after a permanent refusal (a bad filter, a
 * forbidden origin, …) it stops and reports the relay's reason. All other query parameters
 * (`ns`, `ops`, `filter`, `access_token`, …) are passed through untouched.
 *
 * @param {string|(() => string)} url The socket URL. Relative URLs resolve against the page,
 *   and `http(s):` becomes `ws(s):`. Pass a function to compute it per attempt, e.g. to put a
 *   freshly issued `access_token` in it (and say so with `refreshable: true`).
 * @param {ConnectOptions} [options]
 * @returns {Relay}
 */
export function connect(url, options = {}) {
  const {
    onChange = () => {},
    onControl = () => {},
    onStatus = () => {},
    onSource = () => {},
    onReady = () => {},
    resumeAfter = null,
    refreshable = false,
    baseDelay = BASE_DELAY,
    maxDelay = MAX_DELAY,
    stableAfter = STABLE_AFTER,
  } = options;
  const address = addressOf(url, refreshable);

  let lastId = resumeAfter || null;
  let socket = null;
  let timer = null;
  let failures = 0;
  let openedAt = null;
  let closed = false; // no attempt follows: close() was called, or retrying cannot help
  let sourceState = "open"; // what the relay last said of MongoDB; it says nothing while open

  function open() {
    timer = null;
    const target = socketUrl(address(), lastId);
    notify(onStatus, { state: "connecting", url: target, attempt: failures });
    let ws;
    try {
      ws = new WebSocket(target);
    } catch (error) {
      // Some browsers throw (e.g. a SecurityError) instead of failing the connection.
      after({ code: 1006, reason: String(error?.message ?? error), wasClean: false }, "resume");
      return;
    }
    socket = ws;
    ws.onopen = () => {
      openedAt = Date.now();
      notify(onStatus, { state: "open", url: target });
      if (sourceState !== "open") tellSource({ state: "open" });
    };
    ws.onmessage = (event) => receive(event.data);
    ws.onclose = (event) => {
      const opened = ended();
      if (closed) {
        after(event);
      } else if (!opened && event.code === 1006) {
        whyRefused(target).then((refusal) => {
          if (!closed) after(event, refusal ? retryAfterRefusal(refusal.status) : "resume",
            refusal);
        });
      } else {
        after(event, retryAfterClose(event.code, event.reason));
      }
    };
  }

  /** Forget the socket that ended; whether it had opened. Open long enough, it was healthy. */
  function ended() {
    socket = null;
    const opened = openedAt !== null;
    if (opened && Date.now() - openedAt >= stableAfter) failures = 0;
    openedAt = null;
    return opened;
  }

  function restart() {
    lastId = null; // an attempt already waiting (or probing) now starts over too
    const ws = socket;
    if (closed || ws === null) return;
    ws.onopen = ws.onmessage = ws.onclose = () => {}; // nothing more of it reaches the callbacks
    ws.close(1000, "client restarts");
    ended();
    after({ code: 1000, reason: "client restarts", wasClean: true }, "resume");
  }

  /** Report the close, then retry (after the backoff) or stop, as `retry` says. */
  function after({ code, reason, wasClean }, retry = "no", refusal = undefined) {
    const again = !closed && (retry === "fresh_token" ? refreshable : retry !== "no");
    const status = { state: "closed", code, reason, wasClean, retryIn: null };
    if (refusal) status.refusal = refusal;
    if (!again) {
      closed = true;
      notify(onStatus, status);
      return;
    }
    status.retryIn = Math.random() * Math.min(maxDelay, baseDelay * 2 ** Math.min(failures, 30));
    failures += 1;
    notify(onStatus, status);
    timer = setTimeout(open, status.retryIn);
  }

  function receive(data) {
    let message;
    try {
      message = JSON.parse(data);
    } catch {
      message = undefined;
    }
    if (message === null || typeof message !== "object" || Array.isArray(message)) {
      notify(onControl, {
        type: "error",
        code: "invalid_message",
        message: `expected a JSON object per frame, got ${String(data).slice(0, 80)}`,
      });
      return;
    }
    if ("operationType" in message) {
      // Remember before the callback runs: a callback that throws must not cause a replay loop.
      lastId = eventId(message) ?? lastId;
      notify(onChange, message);
      return;
    }
    const moves = message.type === "position" || message.type === "ready";
    if (moves && typeof message.resume_after === "string") lastId = message.resume_after;
    // A snapshot has begun: dropped before its `ready`, the connection starts over, fresh.
    if (message.type === "doc" || message.type === "reset") lastId = null;
    notify(onControl, message);
    if (message.type === "source" && typeof message.state === "string") tellSource(message);
    if (message.type === "ready") notify(onReady, message);
  }

  function tellSource({ state, message, since }) {
    sourceState = state;
    const when = typeof since === "string" ? new Date(since) : null;
    notify(onSource, {
      state,
      message: typeof message === "string" ? message : "",
      since: when && !Number.isNaN(when.getTime()) ? when : null,
    });
  }

  function close() {
    if (closed) return;
    closed = true;
    if (timer !== null) {
      clearTimeout(timer);
      timer = null;
    }
    if (socket) {
      socket.close(1000, "client closed");
    } else {
      notify(onStatus, { state: "closed", code: 1000, reason: "client closed", wasClean: true,
        retryIn: null });
    }
  }

  open();
  return {
    close,
    restart,
    get lastId() {
      return lastId;
    },
  };
}

/**
 * A change to what a live query holds.
 *
 * @typedef {object} LiveChange
 * @property {string} key The document's key in the map ({@link idKey} of its `_id`).
 * @property {object|undefined} document The document now; `undefined` when it left the set.
 * @property {object} message What said so: the change event, or the relay's `leave` message.
 */

/**
 * @typedef {object} LiveQueryOptions
 * @property {(documents: Map<string, object>) => void} [onSnapshot] The whole set was
 *   replaced: by a snapshot (at its `ready`), or emptied by a drop or rename of the collection.
 *   Redraw everything from `documents` (the same Map every time).
 * @property {(change: LiveChange, documents: Map<string, object>) => void} [onChange] One
 *   document changed, entered or left the set.
 * @property {(ready: ControlMessage) => void} [onReady] Every connection's `ready`: from now on
 *   every write reaches this query (on a snapshot connection, after `onSnapshot`).
 *
 * `onControl`, `onStatus`, `onSource` and the other {@link ConnectOptions} work as in
 * {@link connect} (but `resumeAfter`: a new live query has nothing to resume, so it always
 * starts with a snapshot); `onControl` sees `doc`, `leave`, `reset` and `resync` too.
 */

/**
 * The handle {@link liveQuery} returns.
 *
 * @typedef {object} LiveQuery
 * @property {Map<string, object>} documents The current documents, by {@link idKey} of `_id`.
 * @property {() => void} close Stop for good.
 * @property {string|null} lastId As {@link Relay}'s.
 */

/**
 * Follow the current documents of one collection: a snapshot, then every change after it.
 *
 * The URL is a socket URL for one collection (`/socket?ns=db.coll[&filter=…]`); `snapshot=1` is
 * added. The relay sends the matching documents as `doc` frames, then `ready`; this client
 * collects them aside and swaps them in at `ready`, so `documents` always holds one complete
 * state: a connection lost mid-snapshot leaves the previous one in place, and the next one
 * starts the snapshot over (without a resume point). Then:
 *
 * - insert and replace set a document; delete and `leave` remove it;
 * - update takes `fullDocument` when the relay sent it, else applies `updateDescription` to the
 *   document held ({@link applyUpdate}); an update of a document it does not hold, without
 *   `fullDocument`, is a gap: it tells `onControl` `{type: "error", code: "live_query_gap"}`
 *   and starts over as on `resync`;
 * - drop, rename and dropDatabase empty the set;
 * - `reset` (the relay cannot resume what this client holds) voids it: the next snapshot's
 *   `ready` replaces everything, even when no document follows;
 * - `resync` (changes were lost) makes it connect again without a resume point: a fresh
 *   snapshot;
 * - `{type: "error", code: "snapshot_too_large"}` (more matching documents than the relay's
 *   `SNAPSHOT_LIMIT`) stops it for good, as a refusal does: retrying would read as many again.
 *
 * Reconnecting, backoff and resuming are {@link connect}'s (restarts go through its backoff too,
 * so a relay that resyncs every connection cannot make a tight loop of it).
 *
 * ```js
 * const orders = liveQuery("/socket?ns=shop.orders", {
 *   onSnapshot: (documents) => drawAll(documents.values()),
 *   onChange: ({ key, document }) => (document ? drawRow(key, document) : removeRow(key)),
 * });
 * ```
 *
 * @param {string|(() => string)} url
 * @param {ConnectOptions & LiveQueryOptions} [options]
 * @returns {LiveQuery}
 */
export function liveQuery(url, options = {}) {
  const {
    onSnapshot = () => {},
    onChange = () => {},
    onReady = () => {},
    onControl = () => {},
    onStatus = () => {},
  } = options;
  const address = addressOf(url, options.refreshable);
  const documents = new Map();
  let incoming = null; // the snapshot being received: key → document, until its `ready`

  const relay = connect(() => withSnapshot(address()), {
    ...options,
    resumeAfter: null, // an empty map has nothing to resume: the first connection snapshots
    onChange: (change) => changed(change),
    onReady: (ready) => {
      if (incoming !== null || "snapshot" in ready) {
        documents.clear();
        for (const [key, document] of incoming ?? []) documents.set(key, document);
        incoming = null;
        notify(onSnapshot, documents);
      }
      notify(onReady, ready);
    },
    onControl: (message) => {
      notify(onControl, message); // told first: a `resync` is reported before the close it causes
      control(message);
    },
    onStatus: (status) => {
      if (status.state === "connecting") incoming = null; // a snapshot starts over
      notify(onStatus, status);
    },
  });

  function control(message) {
    switch (message.type) {
      case "doc":
        if (message.doc !== null && typeof message.doc === "object") {
          incoming ??= new Map();
          incoming.set(idKey(message.doc._id), message.doc);
        }
        break;
      case "reset":
        incoming = new Map(); // what it held is gone; the snapshot that follows replaces it
        break;
      case "leave":
        remove(message.documentKey?._id, message);
        break;
      case "resync":
        incoming = null;
        relay.restart(); // changes were lost: what it holds is out of date
        break;
      case "error":
        if (message.code === "snapshot_too_large") {
          incoming = null; // what it holds stays as it was
          relay.close(); // the same query would be refused again: a narrower filter is needed
        }
        break;
      default:
    }
  }

  function changed(change) {
    const held = incoming ?? documents; // (changes follow `ready`; this is only defensive)
    const id = change.documentKey?._id;
    switch (change.operationType) {
      case "insert":
      case "replace":
        if (change.fullDocument) put(held, idKey(id), change.fullDocument, change);
        break;
      case "update": {
        const key = idKey(id);
        if (change.fullDocument) put(held, key, change.fullDocument, change);
        else if (held.has(key)) {
          put(held, key, applyUpdate(held.get(key), change.updateDescription ?? {}), change);
        } else {
          gap(`an update of ${key}, which this query does not hold, came without fullDocument`);
        }
        break;
      }
      case "delete":
        remove(id, change);
        break;
      case "drop":
      case "rename":
      case "dropDatabase":
        held.clear();
        if (held === documents) notify(onSnapshot, documents);
        break;
      default:
    }
  }

  /** What it holds can no longer be trusted: say so, and start over with a fresh snapshot. */
  function gap(message) {
    notify(onControl, { type: "error", code: "live_query_gap", message });
    incoming = null;
    relay.restart();
  }

  function put(held, key, document, message) {
    held.set(key, document);
    if (held === documents) notify(onChange, { key, document, message }, documents);
  }

  function remove(id, message) {
    if (id === undefined) return;
    const key = idKey(id);
    if (incoming !== null) incoming.delete(key);
    else if (documents.delete(key)) {
      notify(onChange, { key, document: undefined, message }, documents);
    }
  }

  return {
    documents,
    close: relay.close,
    get lastId() {
      return relay.lastId;
    },
  };
}

/**
 * A document's key in a live query's map: its `_id` as relaxed Extended JSON text, so that an
 * ObjectId, the string of its hex digits and a number never collide. (1, 1.0 and NumberLong(1)
 * share a key, as they share a slot in MongoDB's `_id` index.)
 *
 * @param {unknown} id
 * @returns {string}
 */
export function idKey(id) {
  return JSON.stringify(id) ?? "undefined";
}

/**
 * A document after an update event's `updateDescription`, as MongoDB applied it: arrays cut to
 * `truncatedArrays`' sizes, `removedFields` unset, `updatedFields` set. Paths are dotted; a
 * numeric part indexes an array and names a field of an object (`$set` creates missing objects,
 * pads arrays with null). Where a field name itself holds a dot or is numeric, MongoDB 6.1+ says
 * how to read the path in `disambiguatedPaths` (path → its parts; a number indexes an array), as
 * the drivers document it (e.g. the Node.js driver's `UpdateDescription`). The input is not
 * modified: the objects on a changed path are copied, the rest is shared with it.
 *
 * @param {object} document
 * @param {{updatedFields?: object, removedFields?: string[],
 *   truncatedArrays?: {field: string, newSize: number}[], disambiguatedPaths?: object}} update
 * @returns {object}
 */
export function applyUpdate(document, update) {
  const {
    updatedFields = {}, removedFields = [], truncatedArrays = [], disambiguatedPaths = {},
  } = update;
  const parts = (path) => {
    const told = Object.hasOwn(disambiguatedPaths, path) ? disambiguatedPaths[path] : null;
    return Array.isArray(told) ? told : path.split(".");
  };
  // Copy on write: only the objects and arrays on a changed path are copied, once each.
  const copies = new Set();
  const own = (value) => {
    if (copies.has(value)) return value;
    const copy = Array.isArray(value) ? value.slice() : { ...value };
    copies.add(copy);
    return copy;
  };
  const result = own(document);
  /** The container at `steps`, copied for writing; null where the path leads nowhere. */
  const writable = (steps, create) => {
    let at = result;
    for (const step of steps) {
      const slot = Array.isArray(at) && isIndex(step) ? Number(step) : String(step);
      if (Array.isArray(at) && typeof slot === "number") while (at.length < slot) at.push(null);
      const next = at[slot];
      if (next !== null && typeof next === "object") at[slot] = own(next);
      else if (create) at[slot] = own({}); // $set creates the objects a path leads through
      else return null;
      at = at[slot];
    }
    return at;
  };
  for (const { field, newSize } of truncatedArrays) {
    const steps = parts(field);
    const found = lookUp(result, steps);
    if (!Number.isInteger(newSize) || newSize < 0 || !Array.isArray(found)) continue;
    const array = writable(steps, false);
    array.length = Math.min(array.length, newSize);
  }
  for (const path of removedFields) {
    const steps = parts(path);
    const parent = lookUp(result, steps.slice(0, -1));
    if (parent === null || typeof parent !== "object") continue;
    const last = steps.at(-1);
    const container = writable(steps.slice(0, -1), false);
    if (!Array.isArray(container)) delete container[last];
    else if (isIndex(last) && Number(last) < container.length) container[Number(last)] = null;
  }
  for (const [path, value] of Object.entries(updatedFields)) {
    const steps = parts(path);
    const parent = writable(steps.slice(0, -1), true);
    const last = steps.at(-1);
    if (Array.isArray(parent) && isIndex(last)) {
      while (parent.length < Number(last)) parent.push(null); // $set pads an array with null
      parent[Number(last)] = value;
    } else {
      parent[String(last)] = value;
    }
  }
  return result;
}

/** The value at `steps` inside `document`, or undefined where the path leads nowhere. */
function lookUp(document, steps) {
  let at = document;
  for (const step of steps) {
    if (at === null || typeof at !== "object") return undefined;
    at = Array.isArray(at) && isIndex(step) ? at[Number(step)] : at[String(step)];
  }
  return at;
}

function isIndex(step) {
  return typeof step === "number" ? Number.isInteger(step) && step >= 0 : /^\d+$/.test(step);
}

/** `url` asking for a snapshot: `snapshot=1` first in its query, in place of any it had. */
function withSnapshot(url) {
  const hashAt = url.indexOf("#");
  const hash = hashAt === -1 ? "" : url.slice(hashAt);
  const base = hashAt === -1 ? url : url.slice(0, hashAt);
  const queryAt = base.indexOf("?");
  const path = queryAt === -1 ? base : base.slice(0, queryAt);
  const query = queryAt === -1 ? "" : base.slice(queryAt + 1);
  const parts = query.split("&").filter((part) => part && !/^snapshot(=|$)/.test(part));
  return `${path}?${["snapshot=1", ...parts].join("&")}${hash}`;
}

/**
 * The id of a change event: what the relay resumes after (`resume_after`, SSE's `id:`).
 *
 * It is the whole resume token in one URL-safe string: `_id._data`, and when the token has
 * `_typeBits` (MongoDB writes them when the changed document's key holds a NumberLong, a double
 * or a Decimal128; relaxed Extended JSON shows them as `{$binary: {base64, subType: "00"}}`),
 * a `.` and those bytes in base64url without padding. Without them MongoDB cannot resume there.
 *
 * @param {ChangeEvent} change
 * @returns {string|null} null when the frame has no resume token.
 */
export function eventId(change) {
  const token = change?._id;
  if (typeof token?._data !== "string") return null;
  const bits = token._typeBits?.$binary?.base64;
  if (typeof bits !== "string" || bits === "") return token._data;
  const url = bits.replaceAll("+", "-").replaceAll("/", "_").replace(/=+$/, "");
  return `${token._data}.${url}`;
}

/**
 * Why the relay refused the handshake to `target`, or null if it would admit it now (or cannot
 * be asked): the same URL over HTTP runs the same admission and answers the same refusal.
 *
 * @param {string} target
 * @returns {Promise<Refusal|null>}
 */
async function whyRefused(target) {
  const probe = new URL(target);
  probe.protocol = probe.protocol === "wss:" ? "https:" : "http:";
  let response;
  try {
    response = await fetch(probe.href, {
      cache: "no-store",
      signal: AbortSignal.timeout(PROBE_TIMEOUT),
    });
  } catch {
    return null; // unreachable, or another origin's answer this page may not read
  }
  if (response.ok) return null;
  const body = await response.json().catch(() => ({}));
  // A relay too old to be asked answers every plain GET so; it says nothing about the handshake.
  if (body.error === "websocket_required") return null;
  return {
    status: response.status,
    error: typeof body.error === "string" ? body.error : null,
    message: typeof body.message === "string" ? body.message : `HTTP ${response.status}`,
  };
}

/** The retry policy after a close: by code and reason, else the code's cause, else resume. */
function retryAfterClose(code, reason) {
  const causes = Object.values(DISCONNECTS.closes).filter((cause) => cause.code === code);
  const cause = causes.find((c) => c.reason === reason) ?? causes.find((c) => c.reason === null);
  return cause?.retry ?? "resume";
}

/** The retry policy after a refusal; a status the table does not list goes by its class. */
function retryAfterRefusal(status) {
  return DISCONNECTS.refusals[status] ?? (status >= 500 ? "backoff" : "no");
}

/**
 * The WebSocket URL for one attempt: `url` resolved against the page, with `ws(s):` for
 * `http(s):`, and `resume_after` set when there is an id to resume after. The rest of the query
 * string is kept byte for byte.
 *
 * @param {string} url
 * @param {string|null} resumeAfter
 * @returns {string}
 */
export function socketUrl(url, resumeAfter) {
  let target;
  try {
    target = new URL(url, globalThis.location?.href);
  } catch {
    throw new TypeError(
      `changerelay: cannot resolve ${JSON.stringify(url)}; outside a page pass an absolute URL ` +
        `such as "wss://relay.example.com/socket"`,
    );
  }
  const scheme = { "http:": "ws:", "https:": "wss:" }[target.protocol] ?? target.protocol;
  if (scheme !== "ws:" && scheme !== "wss:") {
    throw new TypeError(
      `changerelay: ${JSON.stringify(url)} is a ${target.protocol} URL; use ws:, wss:, http: ` +
        `or https:`,
    );
  }
  target.protocol = scheme;
  target.hash = "";
  if (resumeAfter) {
    const params = target.search
      .slice(1)
      .split("&")
      .filter((part) => part && part !== "resume_after" && !part.startsWith("resume_after="));
    params.push(`resume_after=${encodeURIComponent(resumeAfter)}`);
    target.search = params.join("&");
  }
  return target.href;
}

/** The URL function of `url`; it throws now, before any timer, if the URL can never work. */
function addressOf(url, refreshable) {
  if (refreshable && typeof url !== "function") {
    throw new TypeError(
      "changerelay: refreshable needs a URL function that puts a fresh token in each URL");
  }
  const address = typeof url === "function" ? url : () => url;
  socketUrl(address(), null);
  return address;
}

/** Call a user callback so that a bug in it is reported but cannot stop the client. */
function notify(callback, ...values) {
  try {
    callback(...values);
  } catch (error) {
    (globalThis.reportError ?? console.error)(error);
  }
}
