/**
 * A client for the Sockets Service (PROTOCOL.md v1.1): one WebSocket that
 * reconnects by itself, resumes what was pushed while it was away from the
 * service's log, de-duplicates by push `id`, refreshes its token before it
 * expires, and answers `emit` with the reply's data or a typed error.
 *
 * No runtime dependency in the browser; under Node 20 pass the `ws`
 * package's class as `WebSocket` (Node 22 has a global one).
 *
 * Written as JavaScript with JSDoc types, checked by TypeScript (strict) and
 * shipped with declarations: the same file runs in Node, in a browser
 * without a build step, and in the host's `/demo` page, which embeds it.
 *
 * @packageDocumentation
 */

/**
 * What the client needs of a WebSocket (the browser's, or `ws`'s). Event
 * parameters are loose so that the DOM's and `ws`'s classes both fit.
 *
 * @typedef {object} WebSocketLike
 * @property {number} readyState
 * @property {((event: any) => void) | null} onopen
 * @property {((event: any) => void) | null} onmessage
 * @property {((event: any) => void) | null} onclose
 * @property {((event: any) => void) | null} onerror
 * @property {(data: string) => void} send
 * @property {(code?: number, reason?: string) => void} close
 */

/**
 * A WebSocket class.
 *
 * @typedef {new (url: string) => WebSocketLike} WebSocketConstructor
 */

/**
 * Returns a token; called at every connect and before the token expires.
 *
 * @typedef {() => string | Promise<string>} TokenProvider
 */

/**
 * How to reach the service and how to behave.
 *
 * @typedef {object} SocketsClientOptions
 * @property {string} url The service's WebSocket URL, e.g. `wss://realtime.example.com/ws`.
 * @property {string | TokenProvider} token A token, or a provider of fresh ones (needed to survive expiry).
 * @property {WebSocketConstructor} [WebSocket] The WebSocket class; default `globalThis.WebSocket`.
 * @property {number} [emitTimeoutMs] How long `emit` waits for its reply, ms (default 10,000).
 * @property {number} [reconnectDelayMs] First reconnect delay bound, ms (default 500); doubles per attempt.
 * @property {number} [maxReconnectDelayMs] Largest reconnect delay bound, ms (default 30,000).
 * @property {number} [refreshBeforeExpiryMs] How long before `exp` a provided token is refreshed, ms (default 60,000).
 * @property {boolean} [resume] Resume missed pushes after a reconnect (default true).
 */

/**
 * A push: an event for this user.
 *
 * @template [T=unknown]
 * @typedef {object} Push
 * @property {string} event The event's name.
 * @property {T} data The event's data.
 * @property {string} id The delivery id: the same for every copy of one delivery.
 * @property {boolean} [ephemeral] Set on an ephemeral push (typing, presence):
 *   never logged or replayed, and never the cursor a `resume` starts after.
 */

/**
 * The connection's state, as `onState` reports it.
 *
 * @typedef {{ state: "connecting", attempt: number }
 *   | { state: "connected", connectionId: string, userId: string, role: string }
 *   | { state: "disconnected", code: number, reason: string, willRetry: boolean }} ConnectionState
 */

/**
 * A failed `emit`: `code` is PROTOCOL's error code (`bad_request`,
 * `not_found`, `forbidden`, …) or, for failures on this side, `timeout`
 * or `disconnected`.
 */
export class SocketsError extends Error {
  /**
   * @param {string} code The protocol's error code, or `timeout` / `disconnected`.
   * @param {string} message What went wrong.
   */
  constructor(code, message) {
    super(message);
    this.name = "SocketsError";
    /** @readonly */
    this.code = code;
  }
}

/** Close codes after which a static token is not tried again. */
const AUTH_CLOSE_CODES = new Set([4001, 1008]);
/** Ids of pushes remembered for de-duplication. */
const REMEMBERED_IDS = 10_000;
/** Recent push ids tried, newest first, when the log does not hold the last. */
const RESUME_CANDIDATES = 20;
/** A client that never got a push resumes `since` its first connect, this much earlier. */
const SINCE_MARGIN_MS = 10_000;
/** How long a `resume` may take (the service flushes its log, then replays up to 30 s). */
const RESUME_TIMEOUT_MS = 45_000;
/** A connection that stayed up this long starts the backoff over. */
const STABLE_AFTER_MS = 10_000;
/** The longest `setTimeout` can wait. */
const MAX_TIMER_MS = 2 ** 31 - 1;
/** The WebSocket `OPEN` ready state. */
const OPEN = 1;

/**
 * The seconds-since-epoch `exp` of a JWT, if it has one.
 *
 * @param {string} token
 * @returns {number | undefined}
 */
function expiryOf(token) {
  const payload = token.split(".")[1];
  if (!payload) return undefined;
  try {
    const base64 = payload.replace(/-/g, "+").replace(/_/g, "/");
    const json = JSON.parse(atob(base64.padEnd(base64.length + ((4 - (base64.length % 4)) % 4), "=")));
    return typeof json.exp === "number" ? json.exp : undefined;
  } catch {
    return undefined;
  }
}

/** A client of the Sockets Service. Call `start()` to connect. */
export class SocketsClient {
  /**
   * @type {Required<Omit<SocketsClientOptions, "WebSocket">> & { WebSocket: WebSocketConstructor }}
   * @private
   */
  _options;
  /**
   * @type {WebSocketLike | undefined}
   * @private
   */
  _socket;
  /**
   * @type {ConnectionState}
   * @private
   */
  _current = { state: "disconnected", code: 1000, reason: "not started", willRetry: false };
  /** @private */
  _stopped = true;
  /** @private */
  _attempt = 0;
  /** @private */
  _nextAck = 1;
  /**
   * @type {Map<number, { resolve: (data: unknown) => void, reject: (error: SocketsError) => void, timer: ReturnType<typeof setTimeout> }>} Emits waiting for their replies.
   * @private
   */
  _pending = new Map();
  /**
   * @type {Map<string, Set<(data: unknown, push: Push) => void>>}
   * @private
   */
  _handlers = new Map();
  /**
   * @type {Set<(state: ConnectionState) => void>}
   * @private
   */
  _stateHandlers = new Set();
  /**
   * @type {Set<string>}
   * @private
   */
  _seen = new Set();
  /**
   * @type {string[]}
   * @private
   */
  _seenOrder = [];
  /**
   * @type {string[]} The last push ids handed to the application, newest last.
   * @private
   */
  _recent = [];
  /**
   * @type {number | undefined} When the client first connected: where a resume starts without a push.
   * @private
   */
  _firstConnectedAt;
  /**
   * @type {number | undefined}
   * @private
   */
  _connectedAt;
  /**
   * Bumped by `start` and `stop`: work of an older generation stops.
   * @private
   */
  _generation = 0;
  /**
   * @type {Push[] | undefined} Pushes held while a resume runs, delivered when it answers.
   * @private
   */
  _held;
  /**
   * @type {string | undefined} The id of the last push frame received while a resume runs.
   * @private
   */
  _replayCursor;
  /**
   * @type {ReturnType<typeof setTimeout> | undefined}
   * @private
   */
  _reconnectTimer;
  /**
   * @type {ReturnType<typeof setTimeout> | undefined}
   * @private
   */
  _refreshTimer;
  /**
   * @type {Array<() => void>}
   * @private
   */
  _waiters = [];

  /** @param {SocketsClientOptions} options */
  constructor(options) {
    const WebSocketClass =
      options.WebSocket ?? /** @type {{ WebSocket?: WebSocketConstructor }} */ (globalThis).WebSocket;
    if (!WebSocketClass) {
      throw new Error("no WebSocket class: pass one (e.g. the `ws` package's) as `WebSocket`");
    }
    this._options = {
      emitTimeoutMs: 10_000,
      reconnectDelayMs: 500,
      maxReconnectDelayMs: 30_000,
      refreshBeforeExpiryMs: 60_000,
      resume: true,
      ...options,
      WebSocket: WebSocketClass,
    };
  }

  /**
   * The connection's state now.
   *
   * @returns {ConnectionState}
   */
  get state() {
    return this._current;
  }

  /** Connects, and keeps connecting until `stop()`. */
  start() {
    if (!this._stopped) return;
    this._stopped = false;
    this._generation += 1;
    this._attempt = 0;
    void this._connect(this._generation);
  }

  /** Closes the connection (1000) and stops reconnecting. */
  stop() {
    this._stopped = true;
    this._generation += 1;
    clearTimeout(this._reconnectTimer);
    clearTimeout(this._refreshTimer);
    this._held = undefined;
    const socket = this._socket;
    this._socket = undefined;
    socket?.close(1000, "client stopped");
    this._failPending("disconnected", "the client stopped");
    this._setState({ state: "disconnected", code: 1000, reason: "client stopped", willRetry: false });
  }

  /**
   * Calls `handler` with each push of `event` (`"*"`: every push); returns an unsubscribe function.
   *
   * @template [T=unknown]
   * @param {string} event
   * @param {(data: T, push: Push<T>) => void} handler
   * @returns {() => boolean}
   */
  on(event, handler) {
    const set = this._handlers.get(event) ?? new Set();
    const untyped = /** @type {(data: unknown, push: Push) => void} */ (handler);
    set.add(untyped);
    this._handlers.set(event, set);
    return () => set.delete(untyped);
  }

  /**
   * Calls `handler` on every state change; returns an unsubscribe function.
   *
   * @param {(state: ConnectionState) => void} handler
   * @returns {() => boolean}
   */
  onState(handler) {
    this._stateHandlers.add(handler);
    return () => this._stateHandlers.delete(handler);
  }

  /**
   * Sends an event and resolves with its reply's `data`, or rejects with a
   * {@link SocketsError}. Waits for the connection (within the timeout).
   *
   * @template [T=unknown]
   * @param {string} event
   * @param {unknown} [data]
   * @param {{ timeoutMs?: number }} [options]
   * @returns {Promise<T>}
   */
  async emit(event, data = {}, options = {}) {
    const timeoutMs = options.timeoutMs ?? this._options.emitTimeoutMs;
    const deadline = Date.now() + timeoutMs;
    while (this._current.state !== "connected") {
      if (this._stopped) throw new SocketsError("disconnected", "the client is stopped");
      const left = deadline - Date.now();
      if (left <= 0) throw new SocketsError("timeout", `not connected within ${timeoutMs} ms`);
      await new Promise((resolve) => {
        const timer = setTimeout(resolve, left);
        this._waiters.push(() => {
          clearTimeout(timer);
          resolve(undefined);
        });
      });
    }
    return /** @type {T} */ (await this._send(event, data, Math.max(deadline - Date.now(), 1)));
  }

  /**
   * Sends a frame with an ack on the open socket.
   *
   * @param {string} event
   * @param {unknown} data
   * @param {number} timeoutMs
   * @returns {Promise<unknown>}
   * @private
   */
  _send(event, data, timeoutMs) {
    const socket = this._socket;
    if (!socket || socket.readyState !== OPEN) {
      return Promise.reject(new SocketsError("disconnected", "not connected"));
    }
    const ack = this._nextAck++;
    return new Promise((resolve, reject) => {
      try {
        socket.send(JSON.stringify({ event, data, ack }));
      } catch (error) {
        reject(new SocketsError("disconnected", `cannot send: ${String(error)}`));
        return;
      }
      const timer = setTimeout(() => {
        this._pending.delete(ack);
        reject(new SocketsError("timeout", `no reply to ${event} within ${timeoutMs} ms`));
      }, Math.min(timeoutMs, MAX_TIMER_MS));
      this._pending.set(ack, { resolve, reject, timer });
    });
  }

  /**
   * The token, from the provider within the emit timeout.
   *
   * @returns {Promise<string>}
   * @private
   */
  async _token() {
    const { token } = this._options;
    if (typeof token !== "function") return token;
    /** @type {ReturnType<typeof setTimeout> | undefined} */
    let timer;
    /** @type {Promise<never>} */
    const timeout = new Promise((_, reject) => {
      timer = setTimeout(() => reject(new Error("the token provider did not answer")), this._options.emitTimeoutMs);
    });
    try {
      return await Promise.race([Promise.resolve(token()), timeout]);
    } finally {
      clearTimeout(timer);
    }
  }

  /**
   * @param {number} generation
   * @private
   */
  async _connect(generation) {
    if (generation !== this._generation) return;
    this._attempt += 1;
    this._setState({ state: "connecting", attempt: this._attempt });
    /** @type {string} */
    let token;
    try {
      token = await this._token();
    } catch (error) {
      if (generation === this._generation) this._closed(1006, `no token: ${String(error)}`, false);
      return;
    }
    if (generation !== this._generation) return;
    const exp = expiryOf(token);
    if (typeof this._options.token === "string" && exp !== undefined && exp * 1000 <= Date.now()) {
      this._stopped = true;
      this._setState({ state: "disconnected", code: 4001, reason: "token expired", willRetry: false });
      return;
    }
    const separator = this._options.url.includes("?") ? "&" : "?";
    /** @type {WebSocketLike} */
    let socket;
    try {
      socket = new this._options.WebSocket(`${this._options.url}${separator}access_token=${encodeURIComponent(token)}`);
    } catch (error) {
      // An unusable URL, or a page that may not open it: retrying cannot help.
      this._stopped = true;
      this._setState({ state: "disconnected", code: 1006, reason: String(error), willRetry: false });
      return;
    }
    this._socket = socket;
    let opened = false;
    let unauthorized = false;
    socket.onopen = () => {
      opened = true;
    };
    socket.onerror = (event) => {
      // `ws` says why an upgrade failed; a browser does not.
      const message = String(event?.message ?? "");
      if (!opened && /\b401\b/.test(message)) unauthorized = true;
    };
    socket.onmessage = (event) => {
      if (this._socket === socket) this._received(socket, String(event.data), token);
    };
    socket.onclose = (event) => {
      if (this._socket !== socket) return;
      this._socket = undefined;
      if (unauthorized) this._closed(401, "unauthorized", true);
      else this._closed(event.code, event.reason, AUTH_CLOSE_CODES.has(event.code));
    };
  }

  /**
   * The socket closed: fail what waits, and retry unless that cannot help.
   *
   * @param {number} code
   * @param {string} reason
   * @param {boolean} authFailure
   * @private
   */
  _closed(code, reason, authFailure) {
    clearTimeout(this._refreshTimer);
    // Logged pushes among them come back with the next resume.
    this._held = undefined;
    this._failPending("disconnected", `the connection closed (${code}${reason ? ` ${reason}` : ""})`);
    if (this._connectedAt !== undefined && Date.now() - this._connectedAt >= STABLE_AFTER_MS) this._attempt = 0;
    this._connectedAt = undefined;
    // A static token refused once is refused again: only a provider can help.
    const willRetry = !this._stopped && !(authFailure && typeof this._options.token === "string");
    if (!willRetry) this._stopped = true;
    this._setState({ state: "disconnected", code, reason, willRetry });
    if (!willRetry) return;
    // Exponential backoff with full jitter.
    const exponent = Math.max(this._attempt - 1, 0);
    const bound = Math.min(this._options.maxReconnectDelayMs, this._options.reconnectDelayMs * 2 ** exponent);
    const generation = this._generation;
    this._reconnectTimer = setTimeout(() => void this._connect(generation), Math.random() * bound);
  }

  /**
   * @param {WebSocketLike} socket
   * @param {string} text
   * @param {string} token
   * @private
   */
  _received(socket, text, token) {
    /** @type {{ event?: string, data?: unknown, id?: string, ephemeral?: boolean, ack?: number, ok?: boolean, error?: { code: string, message: string } }} */
    let frame;
    try {
      frame = JSON.parse(text);
    } catch {
      return;
    }
    if (typeof frame.ack === "number") {
      const pending = this._pending.get(frame.ack);
      if (!pending) return;
      this._pending.delete(frame.ack);
      clearTimeout(pending.timer);
      if (frame.ok) pending.resolve(frame.data ?? null);
      else pending.reject(new SocketsError(frame.error?.code ?? "internal", frame.error?.message ?? "failed"));
      return;
    }
    if (frame.event === "connected" && frame.id === undefined) {
      void this._opened(socket, /** @type {{ connectionId: string, userId: string, role: string }} */ (frame.data), token);
      return;
    }
    if (typeof frame.id === "string" && typeof frame.event === "string") {
      /** @type {Push} */
      const push = { event: frame.event, data: frame.data, id: frame.id };
      if (frame.ephemeral === true) {
        // Live only: handed over at once, even while a resume holds the
        // others, and never a resume cursor (the log does not know it).
        push.ephemeral = true;
        this._deliver(push);
        return;
      }
      if (this._held) {
        this._held.push(push);
        this._replayCursor = push.id;
      } else this._deliver(push);
      return;
    }
    if (frame.event === "error") this._dispatch({ event: "error", data: frame.data, id: "" });
  }

  /**
   * `connected` arrived: resume what was missed, then say connected.
   *
   * @param {WebSocketLike} socket
   * @param {{ connectionId: string, userId: string, role: string }} info
   * @param {string} token
   * @private
   */
  async _opened(socket, info, token) {
    this._scheduleRefresh(socket, token);
    const first = this._firstConnectedAt === undefined;
    this._firstConnectedAt ??= Date.now();
    if (this._options.resume && !first) {
      this._held = [];
      try {
        await this._resume();
      } catch (error) {
        if (this._socket !== socket) return;
        const code = /** @type {SocketsError} */ (error).code;
        if (code !== "not_found") {
          // A timeout, the log briefly unavailable, a rate limit: the next
          // connection resumes again.
          this._held = undefined;
          socket.close(4000, "resume failed, retrying");
          return;
        }
        // Not recoverable from the log: the application reloads its state.
        this._dispatch({ event: "resumeFailed", data: { code }, id: "" });
      }
      if (this._socket !== socket) return;
      const held = this._held ?? [];
      this._held = undefined;
      for (const push of held) this._deliver(push);
    }
    if (this._socket !== socket) return;
    this._connectedAt = Date.now();
    this._setState({ state: "connected", ...info });
  }

  /**
   * Sends `resume` after the last push handed over (or, never having had
   * one, since the first connect), page after page. A page's cursor is the
   * last push frame received before its reply: live pushes and replayed
   * ones look alike (see the README, "Order").
   *
   * @returns {Promise<void>}
   * @private
   */
  async _resume() {
    const candidates = [...this._recent].reverse();
    /** @type {Record<string, unknown>} */
    let from =
      candidates.length > 0
        ? { after: candidates.shift() }
        : { since: new Date((this._firstConnectedAt ?? Date.now()) - SINCE_MARGIN_MS).toISOString() };
    for (;;) {
      this._replayCursor = undefined;
      /** @type {{ more?: boolean }} */
      let reply;
      try {
        reply = /** @type {{ more?: boolean }} */ (await this._send("resume", from, RESUME_TIMEOUT_MS));
      } catch (error) {
        // The last id may be a copy this user got as a sender, which the
        // log keeps for the recipient only: an earlier one will do.
        if (/** @type {SocketsError} */ (error).code === "not_found" && candidates.length > 0) {
          from = { after: candidates.shift() };
          continue;
        }
        throw error;
      }
      // Hand this page over before asking for the next one.
      const page = this._held ?? [];
      this._held = [];
      for (const push of page) this._deliver(push);
      if (!reply.more || this._replayCursor === undefined) return;
      from = { after: this._replayCursor };
    }
  }

  /**
   * @param {WebSocketLike} socket
   * @param {string} token
   * @private
   */
  _scheduleRefresh(socket, token) {
    clearTimeout(this._refreshTimer);
    if (typeof this._options.token !== "function") return;
    const exp = expiryOf(token);
    if (exp === undefined) return;
    const left = exp * 1000 - Date.now();
    // Never sooner than halfway (at most 5 s), so that a provider handing
    // out short-lived tokens does not make a loop of it.
    const wait = Math.max(left - this._options.refreshBeforeExpiryMs, Math.min(left / 2, 5_000), 0);
    this._refreshTimer = setTimeout(() => void this._refresh(socket), Math.min(wait, MAX_TIMER_MS));
  }

  /**
   * @param {WebSocketLike} socket
   * @private
   */
  async _refresh(socket) {
    if (this._socket !== socket) return;
    try {
      const token = await this._token();
      await this._send("refreshToken", { token }, this._options.emitTimeoutMs);
      if (this._socket === socket) this._scheduleRefresh(socket, token);
    } catch {
      // Tried again shortly; at expiry the server closes with 4001 and the
      // reconnect asks the provider again.
      if (this._socket === socket) this._refreshTimer = setTimeout(() => void this._refresh(socket), 5_000);
    }
  }

  /**
   * @param {Push} push
   * @private
   */
  _deliver(push) {
    if (this._seen.has(push.id)) return;
    this._seen.add(push.id);
    this._seenOrder.push(push.id);
    if (this._seenOrder.length > REMEMBERED_IDS) this._seen.delete(/** @type {string} */ (this._seenOrder.shift()));
    if (!push.ephemeral) {
      this._recent.push(push.id);
      if (this._recent.length > RESUME_CANDIDATES) this._recent.shift();
    }
    this._dispatch(push);
  }

  /**
   * @param {Push} push
   * @private
   */
  _dispatch(push) {
    // `error` and `resumeFailed` are not pushes: no `*` for them.
    for (const key of push.id ? [push.event, "*"] : [push.event]) {
      for (const handler of this._handlers.get(key) ?? []) {
        try {
          handler(push.data, push);
        } catch (error) {
          setTimeout(() => {
            throw error;
          });
        }
      }
    }
  }

  /**
   * @param {string} code
   * @param {string} message
   * @private
   */
  _failPending(code, message) {
    for (const [ack, pending] of this._pending) {
      clearTimeout(pending.timer);
      pending.reject(new SocketsError(code, message));
      this._pending.delete(ack);
    }
  }

  /**
   * @param {ConnectionState} state
   * @private
   */
  _setState(state) {
    this._current = state;
    if (state.state === "connected" || this._stopped) {
      const waiters = this._waiters;
      this._waiters = [];
      for (const wake of waiters) wake();
    }
    for (const handler of this._stateHandlers) {
      try {
        handler(state);
      } catch (error) {
        // A handler's error must not stop the reconnects.
        setTimeout(() => {
          throw error;
        });
      }
    }
  }
}
