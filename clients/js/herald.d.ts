// Types for herald.js, the Herald JS SDK (docs/js-sdk.md). Hand-written; herald.js has no build step.

/** The SDK's version, sent in `connect` unless `options.version` says otherwise. */
export const VERSION: string;

/** Any JSON value. */
export type Json = null | boolean | number | string | Json[] | { [key: string]: Json };

/**
 * An error: a reply from the server (codes 100–199, the table in docs/protocol.md) or one the
 * SDK raises itself (1–5, the static constants below).
 */
export class HeraldError extends Error {
  constructor(code: number, message: string);
  readonly name: "HeraldError";
  readonly code: number;
  /** No reply within `options.timeout`. */
  static readonly TIMEOUT: 1;
  /** The connection dropped before the reply came: the command may or may not have been applied. */
  static readonly DISCONNECTED: 2;
  /** The client is disconnected (never connected, `disconnect()`, or a terminal close code). */
  static readonly CLOSED: 3;
  /** More than `options.maxPending` requests waiting for the connection or for their reply. */
  static readonly QUEUE_FULL: 4;
  /** `getToken()` (the client's, or a subscription's) threw or rejected (the error's message is kept). */
  static readonly TOKEN: 5;
}

/** Whether a close code means "do not reconnect": 1000, 1002, 1003, 1007, 1009, 4500–4999. */
export function isTerminal(code: number): boolean;
/** The longest reconnect hint honoured, in milliseconds (60000). */
export const MAX_RECONNECT_HINT: number;
/** The `reconnect_in=<ms>` hint of a shutdown close 1001, capped at MAX_RECONNECT_HINT; else undefined. */
export function reconnectHint(code: number, reason: string): number | undefined;

/** The `exp` claim (Unix seconds) of a JWT, without checking its signature; undefined if none. */
export function tokenExpiry(token: string): number | undefined;

/** The constructor of a WebSocket: the browser's, or `ws`'s in Node. */
export interface WebSocketLike {
  new (url: string, protocol: string): {
    onopen: ((event?: unknown) => void) | null;
    onmessage: ((event: { data: unknown }) => void) | null;
    onclose: ((event: { code: number; reason: string }) => void) | null;
    onerror: ((event?: unknown) => void) | null;
    send(data: string): void;
    close(code?: number, reason?: string): void;
  };
}

export interface HeraldOptions {
  /** A connection token (JWT). Without one (and without getToken) the client is anonymous. */
  token?: string;
  /**
   * Returns a fresh token. Called before connecting when there is no token or it expires
   * within `timeout`, shortly before the token expires (then sent with `refresh`), and after
   * the server closed with 4005 (token expired).
   */
  getToken?: () => string | Promise<string>;
  /** Names the client in the server's logs. */
  name?: string;
  /** Sent as the client's version in `connect`; default: VERSION. */
  version?: string;
  /** The WebSocket implementation; default: globalThis.WebSocket (Node 20 has none: pass `ws`). */
  WebSocket?: WebSocketLike;
  /** Milliseconds to wait for a reply, and for a connection to open; default 10000. */
  timeout?: number;
  /** Milliseconds added to the server's ping interval before the link counts as dead; default 10000. */
  pingMargin?: number;
  /** Reconnect backoff, milliseconds: attempt n waits a random time below min(backoffMax, backoffBase * 2^n). Defaults 250 and 20000. */
  backoffBase?: number;
  backoffMax?: number;
  /** Most requests (publish, history, ...) waiting for the connection or for their reply; default 256. */
  maxPending?: number;
}

export type State = "disconnected" | "connecting" | "connected";

/** The server's `connect` reply. */
export interface ConnectedContext {
  /** This connection's id. */
  client: string;
  /** The server's version. */
  version: string;
  /** Seconds between the server's pings. */
  ping: number;
  /**
   * The server-side subscriptions (the connection token's `channels` claim): their pushes
   * arrive as the client's "subscribed", "publication", "join", "leave" and "unsubscribed" events.
   */
  subscriptions?: string[];
}

export interface DisconnectedContext {
  /** The close code (docs/protocol.md), or 1006 when the SDK gave the link up itself. */
  code: number;
  reason: string;
  /** Whether the SDK will reconnect by itself. */
  reconnect: boolean;
}

/** Which server-side subscription an event is about. */
export interface OnChannel {
  channel: string;
}

export interface Events {
  connecting: { attempt: number };
  connected: ConnectedContext;
  disconnected: DisconnectedContext;
  error: HeraldError;
  /**
   * A server-side subscription started, at this position (once per connection, before its
   * first publication). These are not recovered after a reconnect: when `epoch` is the one
   * seen before and `offset` is beyond the last publication received, read the gap with
   * `history(channel, { since })`.
   */
  subscribed: OnChannel & Position;
  /** A publication of a server-side subscription (each offset once per connection, in order). */
  publication: OnChannel & Publication;
  /** A user joined a server-side subscription's channel (namespaces with `join_leave`). */
  join: OnChannel & ClientInfo;
  leave: OnChannel & ClientInfo;
  /** The server ended a server-side subscription (API `unsubscribe`). */
  unsubscribed: OnChannel & UnsubscribedContext;
}

export interface ClientInfo {
  user: string;
  client: string;
  info?: Json;
}

export interface Publication {
  offset: number;
  data: Json;
  /** The publishing client, when a client published (absent for the HTTP API). */
  info?: ClientInfo;
  /**
   * The channel's namespace is conflated (`conflation = "latest"`): this is the newest
   * publication when it was sent, and the ones between the previous offset and this one were
   * skipped on purpose (they are in history). Not a loss: nothing is recovered for them.
   */
  conflated?: boolean;
}

export interface Position {
  epoch: string;
  offset: number;
}

export interface SubscribedContext extends Position {
  /** True when the missed publications were recovered (they follow, through onPublication). */
  recovered: boolean;
  /**
   * Present (true) in a conflated namespace: publications come at most `max_rate` per second,
   * each the newest, so offsets jump; recovery brings only the newest missed publication.
   */
  conflated?: boolean;
}

/** Why the server ended a subscription. */
export interface UnsubscribedContext {
  /** 117: the subscription token expired. Absent when the backend ended it (API `unsubscribe`). */
  code?: number;
  reason?: string;
}

export interface SubscriptionHandlers {
  /**
   * A subscription token (JWT with `sub` and `channel`), for namespaces whose `subscribe` rule
   * is `"token"`. Sent with every (re)subscribe.
   */
  token?: string;
  /**
   * Returns a fresh subscription token for the channel. Called when there is no token or the
   * kept one expires within `timeout` (at every (re)subscribe), shortly before it expires (then
   * sent with `sub_refresh`), when the server refuses a kept token (101, once), and when the
   * subscription ended because its token expired (117: subscribed again, with recovery).
   */
  getToken?: (channel: string) => string | Promise<string>;
  /** Each publication once, in offset order, across reconnects. */
  onPublication?(pub: Publication): void;
  /** A user's first connection subscribed (namespaces with `join_leave`). */
  onJoin?(info: ClientInfo): void;
  /** A user's last connection left. */
  onLeave?(info: ClientInfo): void;
  /** Recovery was impossible (server restarted, history trimmed): reload the state, then follow live publications. */
  onReset?(position: Position): void;
  /** After every (re)subscribe. */
  onSubscribed?(ctx: SubscribedContext): void;
  /**
   * The server refused the subscription: dropped for 101, 102, 103, 106, 119 and the like;
   * kept, and tried again at the next connect, for 100 and 113. Also `getToken` failing
   * (code 5; tried again with backoff) and a failed `sub_refresh` (the subscription goes on
   * until its token expires, and is then renewed through `getToken`).
   */
  onError?(error: HeraldError): void;
  /**
   * The server ended the subscription: the backend (API `unsubscribe`, no code), or its token
   * expired (code 117) and there is no `getToken`. It is not resubscribed.
   */
  onUnsubscribed?(ctx: UnsubscribedContext): void;
}

export interface Subscription {
  readonly channel: string;
  /** The channel's epoch (after the first subscribe reply). */
  readonly epoch: string | undefined;
  /** The offset of the last publication delivered. */
  readonly offset: number;
  /** The channel's namespace is conflated (from the last subscribe reply). */
  readonly conflated: boolean;
  /** Subscribed on the current connection. */
  readonly active: boolean;
  unsubscribe(): void;
}

export interface HistoryOptions {
  /** At most this many publications (default and maximum: the namespace's history_size). */
  limit?: number;
  /** Only publications after this position. */
  since?: Position;
  /** Newest first. */
  reverse?: boolean;
}

export interface HistoryResult extends Position {
  publications: Publication[];
}

export class Herald {
  /** @param url the native endpoint, e.g. "ws://localhost:8080/connect" */
  constructor(url: string, options?: HeraldOptions);
  readonly url: string;
  readonly state: State;
  /** This connection's id, once connected. */
  readonly client: string | undefined;
  /** Listens to an event; returns a function that removes the listener. */
  on<E extends keyof Events>(event: E, listener: (ctx: Events[E]) => void): () => void;
  /** Opens the connection and keeps it open (reconnecting) until disconnect() or a terminal close. */
  connect(): void;
  /** Closes the connection for good; pending requests fail; subscriptions stay for a later connect(). */
  disconnect(): void;
  /**
   * Subscribes (now if connected, else once connected). Throws HeraldError 105 if already
   * subscribed, or subscribed server-side on this connection.
   */
  subscribe(channel: string, handlers?: SubscriptionHandlers): Subscription;
  /** Publishes where the namespace allows clients to (`publish = true`). */
  publish(channel: string, data: Json): Promise<Position>;
  history(channel: string, options?: HistoryOptions): Promise<HistoryResult>;
  presence(channel: string): Promise<{ clients: Record<string, ClientInfo> }>;
  presenceStats(channel: string): Promise<{ clients: number; users: number }>;
}
