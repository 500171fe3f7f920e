/**
 * changerelay browser client: follow a MongoDB change stream relayed over a WebSocket.
 *
 * The relay sends one JSON object per text frame: either a MongoDB change event (it has
 * `operationType`) or a control message (it has `type`). Connections drop – deploys, slow
 * consumers, flaky networks – so this client reconnects by itself and asks the server to
 * resume after the newest event it has seen, which makes a drop invisible except for latency.
 *
 * ```js
 * import { connect } from "/static/changerelay.js";
 *
 * const relay = connect("/socket?ns=shop.orders", {
 *   onChange: (change) => console.log(change.operationType, change.documentKey),
 *   onControl: (message) => { if (message.type === "resync") reloadEverything(); },
 *   onStatus: (status) => console.log(status.state, status.code ?? ""),
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

/**
 * A MongoDB change event in relaxed Extended JSON, exactly as the server produced it.
 *
 * @typedef {object} ChangeEvent
 * @property {string} operationType `insert`, `update`, `replace`, `delete`, `drop`, `rename`,
 *   `dropDatabase`, `invalidate`, or a newer type – treat unknown ones gracefully.
 * @property {{_data: string}} _id The resume token; `_id._data` is this event's id.
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
 * - `{state: "closed", code, reason, wasClean, retryIn}`: the socket closed. `retryIn` is the
 *   delay in ms before the next attempt, or `null` after {@link Relay#close}.
 *
 * Close codes the server uses: 1001 going away, 1008 policy (e.g. token expired), 1009 message
 * too large, 1011 server error, 1013 slow consumer. 1006 means the connection failed or was cut
 * without a close frame – including every handshake refusal (HTTP 400/401/403/429/503), whose
 * details a browser does not expose.
 *
 * @typedef {object} Status
 * @property {"connecting"|"open"|"closed"} state
 */

/**
 * @typedef {object} ConnectOptions
 * @property {(change: ChangeEvent) => void} [onChange] Called for every change event, in order.
 * @property {(message: ControlMessage) => void} [onControl] Called for control messages.
 * @property {(status: Status) => void} [onStatus] Called on every connection state change.
 * @property {string|null} [resumeAfter] Resume after this event id (`_id._data`) instead of
 *   starting from now, e.g. an id saved from a previous page load.
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
 * On every close other than {@link Relay#close} it reconnects after an exponential backoff
 * with full jitter (a random delay in [0, min(maxDelay, baseDelay · 2^failures)) ms), adding
 * `resume_after=<lastId>` to the URL so the server replays exactly the events missed. All other
 * query parameters (`ns`, `ops`, `filter`, `access_token`, …) are passed through untouched.
 *
 * @param {string|(() => string)} url The socket URL. Relative URLs resolve against the page,
 *   and `http(s):` becomes `ws(s):`. Pass a function to compute it per attempt, e.g. to put a
 *   freshly issued `access_token` in it after a 1008 close.
 * @param {ConnectOptions} [options]
 * @returns {Relay}
 */
export function connect(url, options = {}) {
  const {
    onChange = () => {},
    onControl = () => {},
    onStatus = () => {},
    resumeAfter = null,
    baseDelay = BASE_DELAY,
    maxDelay = MAX_DELAY,
    stableAfter = STABLE_AFTER,
  } = options;
  const address = typeof url === "function" ? url : () => url;
  socketUrl(address(), null); // fail fast, before any timer, on a URL that can never work

  let lastId = resumeAfter || null;
  let socket = null;
  let timer = null;
  let failures = 0;
  let openedAt = null;
  let closed = false;

  function open() {
    timer = null;
    const target = socketUrl(address(), lastId);
    notify(onStatus, { state: "connecting", url: target, attempt: failures });
    let ws;
    try {
      ws = new WebSocket(target);
    } catch (error) {
      // Some browsers throw (e.g. a SecurityError) instead of failing the connection.
      lost({ code: 1006, reason: String(error?.message ?? error), wasClean: false });
      return;
    }
    socket = ws;
    ws.onopen = () => {
      openedAt = Date.now();
      notify(onStatus, { state: "open", url: target });
    };
    ws.onmessage = (event) => receive(event.data);
    ws.onclose = (event) => {
      socket = null;
      if (openedAt !== null && Date.now() - openedAt >= stableAfter) failures = 0;
      openedAt = null;
      lost(event);
    };
  }

  function lost({ code, reason, wasClean }) {
    if (closed) {
      notify(onStatus, { state: "closed", code, reason, wasClean, retryIn: null });
      return;
    }
    const retryIn = Math.random() * Math.min(maxDelay, baseDelay * 2 ** Math.min(failures, 30));
    failures += 1;
    notify(onStatus, { state: "closed", code, reason, wasClean, retryIn });
    timer = setTimeout(open, retryIn);
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
      if (typeof message._id?._data === "string") lastId = message._id._data;
      notify(onChange, message);
      return;
    }
    if (message.type === "position" && typeof message.resume_after === "string") {
      lastId = message.resume_after;
    }
    notify(onControl, message);
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
