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
    resumeAfter = null,
    refreshable = false,
    baseDelay = BASE_DELAY,
    maxDelay = MAX_DELAY,
    stableAfter = STABLE_AFTER,
  } = options;
  if (refreshable && typeof url !== "function") {
    throw new TypeError(
      "changerelay: refreshable needs a URL function that puts a fresh token in each URL");
  }
  const address = typeof url === "function" ? url : () => url;
  socketUrl(address(), null); // fail fast, before any timer, on a URL that can never work

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
      socket = null;
      const opened = openedAt !== null;
      if (opened && Date.now() - openedAt >= stableAfter) failures = 0;
      openedAt = null;
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
    if (message.type === "position" && typeof message.resume_after === "string") {
      lastId = message.resume_after;
    }
    notify(onControl, message);
    if (message.type === "source" && typeof message.state === "string") tellSource(message);
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
    get lastId() {
      return lastId;
    },
  };
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

/** Call a user callback so that a bug in it is reported but cannot stop the client. */
function notify(callback, value) {
  try {
    callback(value);
  } catch (error) {
    (globalThis.reportError ?? console.error)(error);
  }
}
