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
  /** `getToken()` threw or rejected (the error's message is kept). */
  static readonly TOKEN: 5;
}

/** Whether a close code means "do not reconnect": 1000, 1002, 1003, 1007, 1009, 4500–4999. */
export function isTerminal(code: number): boolean;

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
}

export interface DisconnectedContext {
  /** The close code (docs/protocol.md), or 1006 when the SDK gave the link up itself. */
  code: number;
  reason: string;
  /** Whether the SDK will reconnect by itself. */
  reconnect: boolean;
}

export interface Events {
  connecting: { attempt: number };
  connected: ConnectedContext;
  disconnected: DisconnectedContext;
  error: HeraldError;
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
}

export interface Position {
  epoch: string;
  offset: number;
}

export interface SubscribedContext extends Position {
  /** True when the missed publications were recovered (they follow, through onPublication). */
  recovered: boolean;
}

export interface SubscriptionHandlers {
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
  /** The server refused the subscription: dropped for 102, 103, 106 and the like; kept, and tried again at the next connect, for 100 and 113. */
  onError?(error: HeraldError): void;
  /** The backend ended the subscription (API `unsubscribe`); it is not resubscribed. */
  onUnsubscribed?(ctx: Record<string, never>): void;
}

export interface Subscription {
  readonly channel: string;
  /** The channel's epoch (after the first subscribe reply). */
  readonly epoch: string | undefined;
  /** The offset of the last publication delivered. */
  readonly offset: number;
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
  /** Subscribes (now if connected, else once connected). Throws HeraldError 105 if already subscribed. */
  subscribe(channel: string, handlers?: SubscriptionHandlers): Subscription;
  /** Publishes where the namespace allows clients to (`publish = true`). */
  publish(channel: string, data: Json): Promise<Position>;
  history(channel: string, options?: HistoryOptions): Promise<HistoryResult>;
  presence(channel: string): Promise<{ clients: Record<string, ClientInfo> }>;
  presenceStats(channel: string): Promise<{ clients: number; users: number }>;
}
