// Herald JS SDK: one ES module, no dependencies, for browsers and Node (inject `WebSocket`).
// Speaks Herald's native protocol (docs/protocol.md) over one WebSocket: replies matched by
// id, pushes routed to subscriptions, reconnect with backoff, recovery, token refresh (of the
// connection's token and of subscription tokens), server-side subscriptions.

export const VERSION = "0.1.0";

/** An error reply from the server (codes 100–199) or one the SDK raises itself (1–5). */
export class HeraldError extends Error {
  constructor(code, message) {
    super(message);
    this.name = "HeraldError";
    this.code = code;
  }
}
// The SDK's own codes; the server's are 100–199 (docs/protocol.md).
HeraldError.TIMEOUT = 1; // no reply within `timeout`
HeraldError.DISCONNECTED = 2; // the connection dropped before the reply: the outcome is unknown
HeraldError.CLOSED = 3; // the client is disconnected (disconnect(), or a terminal close)
HeraldError.QUEUE_FULL = 4; // more than `maxPending` requests waiting or in flight
HeraldError.TOKEN = 5; // getToken() failed

const { TIMEOUT, DISCONNECTED, CLOSED, QUEUE_FULL, TOKEN } = HeraldError;
const MAX_DELAY = 2 ** 31 - 1; // setTimeout's limit

/** Close codes after which reconnecting cannot help (docs/protocol.md, "Close codes"). */
export const isTerminal = (code) =>
  code === 1000 || code === 1002 || code === 1003 || code === 1007 || code === 1009 || (code >= 4500 && code <= 4999);

/** The `exp` claim (Unix seconds) of a JWT, or undefined. The signature is not checked. */
export function tokenExpiry(token) {
  try {
    const exp = JSON.parse(atob(token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/"))).exp;
    return typeof exp === "number" ? exp : undefined;
  } catch {
    return undefined;
  }
}

// Runs an application callback; what it throws is reported asynchronously (console, or the
// process's uncaught exception) without breaking the delivery loop.
function call(fn, arg) {
  try {
    if (fn) fn(arg);
  } catch (e) {
    setTimeout(() => {
      throw e;
    });
  }
}

const asError = (e, code) => (e instanceof HeraldError ? e : new HeraldError(code, String((e && e.message) || e)));

/** The longest reconnect hint honoured (ms): a server's number never makes us wait longer. */
export const MAX_RECONNECT_HINT = 60000;

/**
 * The reconnect hint of a shutdown close: `reconnect_in=<ms>` in the reason of a 1001
 * (docs/protocol.md, "Reconnect hint on shutdown"), capped at MAX_RECONNECT_HINT; else undefined.
 */
export function reconnectHint(code, reason) {
  if (code !== 1001 || typeof reason !== "string") return undefined;
  const m = /reconnect_in=(\d+)/.exec(reason);
  return m ? Math.min(Number(m[1]), MAX_RECONNECT_HINT) : undefined;
}

// Exponential backoff with full jitter: a uniform random wait below min(max, base * 2^n).
const backoff = ({ backoffBase, backoffMax }, n) => Math.random() * Math.min(backoffMax, backoffBase * 2 ** Math.min(n, 30));

// Whether a token (kept from before) must be replaced first: missing, or expiring within ms.
const stale = (token, ms) => {
  const exp = token && tokenExpiry(token);
  return !token || (exp && exp * 1000 - Date.now() < ms);
};

// When to ask for a new token: in the last fifth of its life, at most a minute early; at most
// once a second, should this clock run far ahead of the token issuer's.
const refreshIn = (exp) => {
  const left = exp * 1000 - Date.now();
  return Math.max(1000, left - Math.min(left / 5, 60000));
};

// A server push's kind and body: {"channel":..,"pub":{..}} -> ["pub", {..}].
const kind = (push) => Object.entries(push).find(([k]) => k !== "channel") || [];

export class Herald {
  /**
   * @param {string} url e.g. "ws://localhost:8080/connect"
   * @param {object} [options] see herald.d.ts
   */
  constructor(url, options = {}) {
    this.url = url;
    this.options = {
      timeout: 10000,
      pingMargin: 10000,
      backoffBase: 250,
      backoffMax: 20000,
      maxPending: 256,
      version: VERSION,
      WebSocket: globalThis.WebSocket,
      ...options,
    };
    if (!this.options.WebSocket) throw new TypeError("no WebSocket here: pass options.WebSocket (e.g. from 'ws')");
    this.token = options.token;
    this.state = "disconnected"; // "connecting" | "connected"
    this.client = undefined; // this connection's id, from the connect reply
    this.subs = new Map(); // channel -> Subscription
    this.server = new Map(); // server-side subscriptions (the token's channels claim): channel -> last offset
    this.pending = new Map(); // id -> request sent, awaiting its reply
    this.queue = []; // requests waiting for the connection
    this.listeners = {};
    this.attempt = 0;
    this.timers = {};
  }

  /**
   * Listens for "connecting", "connected", "disconnected", "error", and the pushes of
   * server-side subscriptions: "subscribed", "publication", "join", "leave", "unsubscribed".
   * Returns off().
   */
  on(event, fn) {
    const set = (this.listeners[event] ||= new Set());
    set.add(fn);
    return () => set.delete(fn);
  }

  _emit(event, ctx) {
    for (const fn of this.listeners[event] || []) call(fn, ctx);
  }

  _timer(name, ms, fn) {
    clearTimeout(this.timers[name]);
    if (ms === undefined) delete this.timers[name];
    else this.timers[name] = setTimeout(fn, Math.min(Math.max(ms, 0), MAX_DELAY));
  }

  /** Opens the connection (and keeps it open until disconnect() or a terminal close). */
  connect() {
    if (this.state !== "disconnected") return;
    this.stopped = false;
    this.attempt = 0;
    this._open();
  }

  /** Closes the connection for good; subscriptions are kept for a later connect(). */
  disconnect() {
    if (this.state === "disconnected") return;
    this.stopped = true;
    this._lost(1000, "disconnected by the client", false);
  }

  async _open() {
    const run = (this.run = {}); // a later _open() (disconnect(), then connect()) supersedes this one
    this.state = "connecting";
    this._emit("connecting", { attempt: this.attempt });
    const { getToken, timeout } = this.options;
    // A token that is missing or expires within the timeout is replaced before connecting.
    let fresh = false;
    if (getToken && stale(this.token, timeout)) {
      let token;
      try {
        token = await getToken();
      } catch (e) {
        if (this.stopped || run !== this.run) return;
        this._emit("error", asError(e, TOKEN));
        return this._retry();
      }
      if (this.stopped || run !== this.run) return;
      this.token = token;
      fresh = true;
    }
    let ws;
    try {
      ws = this.ws = new this.options.WebSocket(this.url, "herald.v1");
    } catch (e) {
      // A malformed URL, most likely: retrying cannot help.
      this._emit("error", asError(e, CLOSED));
      return this._lost(1006, "cannot open a WebSocket: " + e.message, false);
    }
    this.nextId = 1;
    this._timer("open", timeout, () => this._lost(1006, "connect timed out"));
    ws.onopen = () => {
      const { name, version } = this.options;
      this._send("connect", { token: this.token, name, version }, true, (e, info) => {
        if (!e) return this._ready(info);
        if (ws !== this.ws || e.code === DISCONNECTED) return; // _lost already handled it
        this._emit("error", e);
        // A kept token the server refuses (its key rotated, say) is replaced once from getToken.
        const stale = e.code === 101 && getToken && !fresh;
        if (stale) this.token = undefined;
        const retry = stale || e.code === TIMEOUT || e.code === 100 || e.code === 113;
        this._lost(1006, "connect refused: " + e.message, retry);
      });
    };
    ws.onmessage = (event) => ws === this.ws && this._message(event.data);
    ws.onclose = (event) => ws === this.ws && this._lost(event.code, event.reason);
    ws.onerror = () => {}; // a close event follows
  }

  _ready(info) {
    this._timer("open");
    this.state = "connected";
    this.client = info.client;
    this.connectedAt = Date.now();
    this.pingMs = info.ping * 1000;
    this.seen = Date.now();
    if (this.pingMs > 0) this._watch();
    this.server = new Map();
    this._scheduleRefresh(tokenExpiry(this.token || ""));
    for (const sub of this.subs.values()) sub._subscribe();
    const queued = this.queue;
    this.queue = [];
    for (const req of queued) this._transmit(req);
    this._emit("connected", info);
  }

  // The connection ended (or is given up): clean up, tell the app, and reconnect unless told not to.
  _lost(code, reason, reconnect = !isTerminal(code)) {
    const ws = this.ws;
    this.ws = undefined;
    if (ws) {
      ws.onopen = ws.onmessage = ws.onclose = null;
      try {
        if (code === 1000) ws.close(1000);
        else if (ws.terminate) ws.terminate();
        else ws.close();
      } catch {
        // already closed
      }
    }
    for (const name of Object.keys(this.timers)) this._timer(name);
    for (const req of this.pending.values()) {
      clearTimeout(req.timer);
      req.done(new HeraldError(DISCONNECTED, `connection lost before the ${req.cmd} reply`));
    }
    this.pending.clear();
    for (const sub of this.subs.values()) sub.active = false;
    if (code === 4005) {
      // The token expired: only a fresh one from getToken can reconnect.
      this.token = undefined;
      reconnect = reconnect && !!this.options.getToken;
    }
    reconnect = reconnect && !this.stopped;
    this.hint = reconnectHint(code, reason);
    if (this.connectedAt && Date.now() - this.connectedAt >= this.options.backoffMax) this.attempt = 0;
    this.connectedAt = undefined;
    this.state = reconnect ? "connecting" : "disconnected";
    if (!reconnect) {
      this.stopped = true;
      for (const req of this.queue.splice(0)) {
        clearTimeout(req.timer);
        req.done(new HeraldError(CLOSED, "the client is disconnected"));
      }
    }
    this._emit("disconnected", { code, reason, reconnect });
    if (reconnect) this._retry();
  }

  _retry() {
    this.state = "connecting";
    // After a shutdown close with a hint: the hint plus up to a tenth of it (at least 100 ms)
    // of jitter, instead of the backoff.
    const hint = this.hint;
    this.hint = undefined;
    const delay = hint === undefined ? backoff(this.options, this.attempt++) : hint + Math.random() * Math.max(100, hint / 10);
    this._timer("retry", delay, () => this._open());
  }

  // Anything from the server proves the link alive; silence for ping + margin means it is
  // dead (a half-open TCP connection can stay silent for minutes without a close event).
  _watch() {
    const ms = this.pingMs + this.options.pingMargin;
    const left = this.seen + ms - Date.now();
    if (left <= 0) return this._lost(1006, `nothing from the server for ${ms} ms`);
    this._timer("alive", left, () => this._watch());
  }

  _message(text) {
    let msg;
    try {
      msg = JSON.parse(text);
    } catch {
      return this._emit("error", new HeraldError(107, "the server sent a frame that is not JSON"));
    }
    if (!msg || typeof msg !== "object") return;
    this.seen = Date.now();
    if (msg.id !== undefined) {
      const req = this.pending.get(msg.id);
      if (!req) return;
      this.pending.delete(msg.id);
      clearTimeout(req.timer);
      if (msg.error) req.done(new HeraldError(msg.error.code, msg.error.message));
      else req.done(undefined, msg[req.cmd]);
    } else if (msg.push) {
      const { channel } = msg.push;
      const sub = this.subs.get(channel);
      const [key, body] = kind(msg.push);
      if (sub && sub.active) sub._push(key, body);
      else if (key === "subscribe" || this.server.has(channel)) this._serverPush(channel, key, body);
    } else if (msg.error) {
      this._emit("error", new HeraldError(msg.error.code, msg.error.message));
    } else if (Object.keys(msg).length === 0) {
      this.ws.send("{}"); // the app-level ping: answer with a pong
    }
  }

  // Sends a command now (`now`: connect and the SDK's own commands) or once connected.
  // `done(error, result)` runs as the reply is read, before the frames that follow it.
  _send(cmd, args, now, done) {
    const { timeout, maxPending } = this.options;
    if (!now && this.state === "disconnected")
      return done(new HeraldError(CLOSED, "the client is disconnected: call connect() first"));
    if (!now && this.pending.size + this.queue.length >= maxPending)
      return done(new HeraldError(QUEUE_FULL, `more than ${maxPending} requests pending`));
    const req = { cmd, args, done };
    req.timer = setTimeout(() => {
      this.pending.delete(req.id);
      this.queue = this.queue.filter((r) => r !== req);
      done(new HeraldError(TIMEOUT, `no ${cmd} reply within ${timeout} ms`));
    }, timeout);
    if (now || this.state === "connected") this._transmit(req);
    else this.queue.push(req);
  }

  _request(cmd, args) {
    return new Promise((resolve, reject) => this._send(cmd, args, false, (e, r) => (e ? reject(e) : resolve(r))));
  }

  _transmit(req) {
    req.id = this.nextId++;
    if (this.nextId > 0xffffffff) this.nextId = 1;
    this.pending.set(req.id, req);
    this.ws.send(JSON.stringify({ id: req.id, [req.cmd]: req.args }));
  }

  // A push of a server-side subscription, as an event with its channel. The server delivers
  // each publication once while connected; these are not recovered after a reconnect (the
  // "subscribed" event gives the position to read history from).
  _serverPush(channel, key, body) {
    if (key === "subscribe") this.server.set(channel, body.offset);
    if (key === "unsubscribe") this.server.delete(channel);
    if (key === "pub" && body.offset !== undefined) {
      if (body.offset <= this.server.get(channel)) return;
      this.server.set(channel, body.offset);
    }
    const event = { pub: "publication", subscribe: "subscribed", unsubscribe: "unsubscribed" }[key] || key;
    this._emit(event, { channel, ...body });
  }

  // Asks getToken for a new token shortly before the current one expires. On failure the
  // server closes with 4005 at expiry and the client reconnects with a fresh token.
  _scheduleRefresh(exp) {
    if (!this.options.getToken || !exp) return this._timer("refresh");
    this._timer("refresh", refreshIn(exp), () => this._refresh());
  }

  async _refresh() {
    const ws = this.ws;
    try {
      const token = await this.options.getToken();
      if (ws !== this.ws) return;
      this.token = token;
      this._send("refresh", { token }, true, (e, reply) => {
        if (e) this._emit("error", e);
        else this._scheduleRefresh(reply.expires);
      });
    } catch (e) {
      if (ws === this.ws) this._emit("error", asError(e, TOKEN));
    }
  }

  /**
   * Subscribes to a channel; resubscribes (recovering what was missed) after every reconnect.
   * `handlers` may carry a subscription `token` and `getToken(channel)` (see herald.d.ts).
   * @returns {Subscription}
   */
  subscribe(channel, handlers = {}) {
    if (this.subs.has(channel) || this.server.has(channel)) throw new HeraldError(105, `already subscribed to ${channel}`);
    const sub = new Subscription(this, channel, handlers);
    this.subs.set(channel, sub);
    if (this.state === "connected") sub._subscribe();
    return sub;
  }

  /** Publishes `data` (any JSON value); resolves to {epoch, offset}. */
  publish(channel, data) {
    return this._request("publish", { channel, data });
  }

  /** Reads a channel's history; resolves to {epoch, offset, publications}. */
  history(channel, { limit, since, reverse } = {}) {
    return this._request("history", { channel, limit, since, reverse });
  }

  /** Who is subscribed; resolves to {clients: {<client>: {user, client, info?}}}. */
  presence(channel) {
    return this._request("presence", { channel });
  }

  /** Resolves to {clients, users}. */
  presenceStats(channel) {
    return this._request("presence_stats", { channel });
  }
}

/** One channel's subscription: its position, for recovery, its token, and the app's handlers. */
class Subscription {
  constructor(herald, channel, handlers) {
    this.herald = herald;
    this.channel = channel;
    this.handlers = handlers;
    this.token = handlers.token; // the subscription token, replaced through handlers.getToken
    this.epoch = undefined; // set by the first subscribe reply
    this.offset = 0; // the last publication delivered
    this.conflated = false; // the server sends the newest at a bounded rate: offsets jump
    this.active = false; // subscribed on the current connection
    this.tries = 0; // getToken failures in a row
    this.timer = "s:" + channel; // its refresh or retry timer, among the client's
  }

  get _current() {
    return this.herald.subs.get(this.channel) === this;
  }

  // Subscribes on the current connection, with the kept token or a fresh one from getToken when
  // it has none or the kept one expires soon, and with recovery once it has a position.
  async _subscribe(fresh) {
    const { herald, channel, handlers } = this;
    const { getToken, onError } = handlers;
    const ws = herald.ws;
    if (getToken && stale(this.token, herald.options.timeout)) {
      let token;
      try {
        token = await getToken(channel);
      } catch (e) {
        if (ws !== herald.ws || !this._current) return;
        call(onError, asError(e, TOKEN));
        return herald._timer(this.timer, backoff(herald.options, this.tries++), () => this._subscribe());
      }
      if (ws !== herald.ws || !this._current) return; // a reconnect subscribes again
      this.token = token;
      fresh = true;
    }
    const { epoch, offset, token } = this;
    const args = epoch ? { channel, recover: true, epoch, offset, token } : { channel, token };
    herald._send("subscribe", args, true, (e, reply) => {
      if (!this._current) return;
      if (!e) return this._subscribed(reply);
      if (e.code === DISCONNECTED) return; // resubscribed after the reconnect
      if (e.code === TIMEOUT) return herald._lost(1006, `no subscribe reply for ${channel}`);
      // A kept token the server refuses is replaced once from getToken.
      if (e.code === 101 && getToken && !fresh) {
        this.token = undefined;
        return this._subscribe();
      }
      // 100 and 113 (e.g. the server is shutting down) are tried again at the next connect.
      if (e.code !== 100 && e.code !== 113) herald.subs.delete(channel);
      call(onError, e);
    });
  }

  _subscribed(reply) {
    const h = this.handlers;
    const recovered = !!reply.recovered && reply.epoch === this.epoch;
    if (this.epoch === undefined || !recovered) {
      const reset = this.epoch !== undefined;
      this.epoch = reply.epoch;
      this.offset = reply.offset;
      if (reset) call(h.onReset, { epoch: reply.epoch, offset: reply.offset });
    }
    this.active = true;
    this.tries = 0;
    // In a conflated namespace an offset jump is the server skipping values on purpose, not a
    // loss: recovery then returns only the newest missed publication.
    this.conflated = !!reply.conflated;
    this._scheduleRefresh(reply.expires);
    const ctx = { epoch: reply.epoch, offset: reply.offset, recovered };
    if (this.conflated) ctx.conflated = true;
    call(h.onSubscribed, ctx);
    if (recovered) for (const pub of reply.publications || []) this._publication(pub);
  }

  // Replaces the subscription token with sub_refresh before it expires. On failure the server
  // ends the subscription at expiry (117), and it is renewed with a fresh token then.
  _scheduleRefresh(exp) {
    if (this.handlers.getToken && exp) this.herald._timer(this.timer, refreshIn(exp), () => this._refresh());
  }

  async _refresh() {
    const { herald, channel, handlers } = this;
    const ws = herald.ws;
    const live = () => ws === herald.ws && this._current && this.active;
    try {
      const token = await handlers.getToken(channel);
      if (!live()) return;
      this.token = token;
      herald._send("sub_refresh", { channel, token }, true, (e, reply) => {
        if (!e) this._scheduleRefresh(reply.expires);
        else if (e.code !== DISCONNECTED && live()) call(handlers.onError, e);
      });
    } catch (e) {
      if (live()) call(handlers.onError, asError(e, TOKEN));
    }
  }

  // Delivers each offset once and in order: what recovery sent again is skipped.
  _publication(pub) {
    if (pub.offset !== undefined) {
      if (pub.offset <= this.offset) return;
      this.offset = pub.offset;
    }
    // A recovered publication of a conflated channel is marked like the live ones.
    if (this.conflated && !pub.conflated) pub = { ...pub, conflated: true };
    call(this.handlers.onPublication, pub);
  }

  _push(key, body) {
    const h = this.handlers;
    if (key === "pub") this._publication(body);
    else if (key === "join") call(h.onJoin, body);
    else if (key === "leave") call(h.onLeave, body);
    else if (key === "unsubscribe") {
      this.active = false;
      this.herald._timer(this.timer);
      if (body.code === 117 && h.getToken) {
        // The subscription token expired: subscribe again with a fresh one, recovering the gap.
        this.token = undefined;
        this._subscribe();
      } else {
        // The backend ended this subscription (or its token expired, and there is no getToken):
        // it is not resubscribed.
        this.herald.subs.delete(this.channel);
        call(h.onUnsubscribed, body);
      }
    }
  }

  /** Stops the subscription (tells the server when connected). */
  unsubscribe() {
    const { herald, channel } = this;
    if (!this._current) return;
    herald.subs.delete(channel);
    herald._timer(this.timer);
    this.active = false;
    if (herald.state === "connected") herald._send("unsubscribe", { channel }, true, () => {});
  }
}
