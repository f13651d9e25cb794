// The SDK's frames against the golden fixtures that the Rust tests read too, so the SDK and
// the server cannot drift apart. A scripted socket stands in for the network here (pure
// encoding and decoding); everything else is tested against a real server.

import assert from "node:assert/strict";
import { readFileSync, readdirSync } from "node:fs";
import { test } from "node:test";
import { gzipSync } from "node:zlib";

import { Herald, HeraldError, isTerminal, MAX_RECONNECT_HINT, reconnectHint, tokenExpiry } from "../herald.js";

const fixtures = new URL("../../../crates/herald-protocol/tests/fixtures/", import.meta.url);
const fixture = (side, name) => readFileSync(new URL(`${side}/${name}.json`, fixtures), "utf8").trim();

/** A WebSocket that records what the SDK sends and lets the test play the server. */
class ScriptedSocket {
  static last;
  constructor(url, protocol) {
    this.url = url;
    this.protocol = protocol;
    this.sent = [];
    ScriptedSocket.last = this;
    setTimeout(() => this.onopen && this.onopen());
  }
  send(text) {
    this.sent.push(text);
  }
  close() {}
  receive(text) {
    this.onmessage({ data: text });
  }
  drop(code) {
    this.onclose({ code, reason: "" });
  }
}

const tick = () => new Promise((r) => setTimeout(r, 5));

function sameFrame(sent, name) {
  const expected = fixture("client", name);
  const id = JSON.parse(expected).id;
  const frame = JSON.parse(sent);
  // Re-encode with the fixture's id first, as the SDK writes it; the rest must match byte for byte.
  const { id: _, ...rest } = frame;
  assert.equal(JSON.stringify({ id, ...rest }), expected, `${name}: ${sent}`);
  assert.equal(sent.startsWith(`{"id":${frame.id},`), true, `${name}: id first`);
}

async function connected(options = {}) {
  const herald = new Herald("ws://x/connect", { WebSocket: ScriptedSocket, ...options });
  herald.connect();
  await tick();
  const ws = ScriptedSocket.last;
  return { herald, ws };
}

test("every client command is encoded exactly as its golden fixture", async () => {
  const token = "eyJhbGciOiJIUzI1NiJ9.e30.sig";
  const { herald, ws } = await connected({ token, name: "web", version: "1.2.0", getToken: async () => token });
  assert.equal(ws.protocol, "herald.v1");
  sameFrame(ws.sent[0], "connect");
  ws.receive(fixture("server", "connect"));
  await tick();

  herald.subscribe("chat:lobby", {});
  sameFrame(ws.sent.at(-1), "subscribe");
  ws.receive(`{"id":2,"subscribe":{"epoch":"k3f9","offset":41}}`);
  await tick();

  herald.publish("chat:lobby", { text: "hi" }).catch(() => {});
  sameFrame(ws.sent.at(-1), "publish");
  herald.history("chat:lobby", { limit: 50, since: { epoch: "k3f9", offset: 40 }, reverse: true }).catch(() => {});
  sameFrame(ws.sent.at(-1), "history");
  herald.presence("chat:lobby").catch(() => {});
  sameFrame(ws.sent.at(-1), "presence");
  herald.presenceStats("chat:lobby").catch(() => {});
  sameFrame(ws.sent.at(-1), "presence_stats");
  herald._refresh();
  await tick();
  sameFrame(ws.sent.at(-1), "refresh");

  ws.receive("{}");
  assert.equal(ws.sent.at(-1), fixture("client", "pong"));

  // After a drop, the subscription asks to recover from its last position.
  ws.drop(4000);
  await new Promise((r) => setTimeout(r, 400));
  const ws2 = ScriptedSocket.last;
  assert.notEqual(ws2, ws);
  ws2.receive(`{"id":1,"connect":{"client":"c2","version":"0.1.0","ping":25}}`);
  await tick();
  sameFrame(ws2.sent.at(-1), "subscribe_recover");

  herald.subscribe("other", {}).unsubscribe();
  sameFrame(ws2.sent.at(-1).replace('"other"', '"chat:lobby"'), "unsubscribe");

  // A subscription token (without exp here, so never stale) on subscribe and on sub_refresh.
  const sub = herald.subscribe("private:room", { token, getToken: async () => token });
  sameFrame(ws2.sent.at(-1), "subscribe_token");
  ws2.receive(fixture("server", "subscribe_token").replace('"id":11', `"id":${JSON.parse(ws2.sent.at(-1)).id}`));
  sub._refresh();
  await tick();
  sameFrame(ws2.sent.at(-1), "sub_refresh");
  herald.disconnect();
});

test("every server frame is decoded", async () => {
  const { herald, ws } = await connected();
  const seen = { connected: [], errors: [], pubs: [], joins: [], leaves: [], subscribed: [], unsub: [] };
  herald.on("connected", (c) => seen.connected.push(c));
  herald.on("error", (e) => seen.errors.push(e));
  const result = (name) => {
    const frame = JSON.parse(fixture("server", name));
    return Object.values(frame).at(-1);
  };

  ws.receive(fixture("server", "connect"));
  await tick();
  assert.deepEqual(seen.connected, [result("connect")]);
  assert.equal(herald.client, "5f0c2d4e-8a1b-4c3d-9e2f-7a6b5c4d3e2f");
  assert.equal(herald.state, "connected");

  herald.subscribe("chat:lobby", {
    onPublication: (p) => seen.pubs.push(p),
    onJoin: (i) => seen.joins.push(i),
    onLeave: (i) => seen.leaves.push(i),
    onSubscribed: (s) => seen.subscribed.push(s),
    onUnsubscribed: (u) => seen.unsub.push(u),
  });
  ws.receive(fixture("server", "subscribe"));
  await tick();
  assert.deepEqual(seen.subscribed, [{ epoch: "k3f9", offset: 44, recovered: false }]);

  // Replies are matched by id: send requests until the ids of the fixtures are reached.
  const replies = {};
  const ask = (name, promise) => promise.then((r) => (replies[name] = r), (e) => (replies[name] = e));
  ask("publish_0", herald.publish("chat:lobby", 1)); // id 3
  ask("publish", herald.publish("chat:lobby", 1)); // id 4
  ask("unsubscribe", herald._request("unsubscribe", { channel: "x" })); // id 5
  ask("error", herald.history("chat:lobby")); // id 6
  ask("history", herald.history("chat:lobby")); // id 7
  ask("presence", herald.presence("chat:lobby")); // id 8
  ask("presence_stats", herald.presenceStats("chat:lobby")); // id 9
  ask("refresh", herald._request("refresh", { token: "t" })); // id 10
  for (const name of ["publish", "unsubscribe", "error", "history", "presence", "presence_stats", "refresh"])
    ws.receive(fixture("server", name));
  await tick();
  for (const name of ["publish", "unsubscribe", "history", "presence", "presence_stats", "refresh"])
    assert.deepEqual(replies[name], result(name), name);
  assert.ok(replies.error instanceof HeraldError);
  assert.equal(replies.error.code, 103);
  assert.equal(replies.error.message, "permission denied");
  assert.equal(replies.publish_0, undefined, "no reply for id 3 yet");

  ws.receive(fixture("server", "error_without_id"));
  assert.equal(seen.errors.length, 1);
  assert.equal(seen.errors[0].code, 107);

  ws.receive(fixture("server", "push_pub"));
  assert.deepEqual(seen.pubs, [result("push_pub").pub]);
  ws.receive(fixture("server", "push_pub")); // the same offset again: delivered once
  assert.equal(seen.pubs.length, 1);
  ws.receive(fixture("server", "push_join"));
  ws.receive(fixture("server", "push_leave"));
  assert.deepEqual(seen.joins, [result("push_join").join]);
  assert.deepEqual(seen.leaves, [result("push_leave").leave]);

  const before = ws.sent.length;
  ws.receive(fixture("server", "ping"));
  assert.deepEqual(ws.sent.slice(before), ["{}"]);

  ws.receive(fixture("server", "push_unsubscribe"));
  assert.deepEqual(seen.unsub, [{}]);
  assert.equal(herald.subs.size, 0, "the backend ended the subscription: not resubscribed");
  herald.disconnect();
});

test("server-side subscriptions: their pushes are events with the channel", async () => {
  const { herald, ws } = await connected();
  const events = [];
  for (const e of ["connected", "subscribed", "publication", "join", "leave", "unsubscribed"])
    herald.on(e, (ctx) => events.push([e, ctx]));
  ws.receive(fixture("server", "connect_subscriptions"));
  const reply = JSON.parse(fixture("server", "connect_subscriptions")).connect;
  ws.receive(fixture("server", "push_subscribe"));
  const pub = fixture("server", "push_pub").replace('"chat:lobby"', '"news"');
  ws.receive(pub);
  ws.receive(pub); // the same offset again: delivered once
  ws.receive(fixture("server", "push_join").replace('"chat:lobby"', '"news"'));
  assert.throws(() => herald.subscribe("news"), (e) => e.code === 105);
  ws.receive(fixture("server", "push_unsubscribe").replace('"chat:lobby"', '"news"'));
  ws.receive(pub.replace('"offset":45', '"offset":46')); // after its end: nothing
  const join = JSON.parse(fixture("server", "push_join")).push.join;
  assert.deepEqual(events, [
    ["connected", reply],
    ["subscribed", { channel: "news", epoch: "k3f9", offset: 44 }],
    ["publication", { channel: "news", ...JSON.parse(pub).push.pub }],
    ["join", { channel: "news", ...join }],
    ["unsubscribed", { channel: "news" }],
  ]);
  assert.deepEqual(reply.subscriptions, ["news", "notifications#42"]);
  herald.disconnect();
});

test("an expired subscription token: resubscribed with a fresh one and recovery, or reported", async () => {
  const { herald, ws } = await connected();
  ws.receive(fixture("server", "connect"));
  await tick();
  const calls = [];
  const subscribed = [];
  const sub = herald.subscribe("private:room", {
    getToken: async (channel) => (calls.push(channel), `fresh${calls.length}`),
    onSubscribed: (s) => subscribed.push(s),
  });
  await tick();
  assert.deepEqual(calls, ["private:room"]);
  const first = JSON.parse(ws.sent.at(-1));
  assert.deepEqual(first.subscribe, { channel: "private:room", token: "fresh1" });
  ws.receive(fixture("server", "subscribe_token").replace('"id":11', `"id":${first.id}`));
  await tick();
  assert.deepEqual(subscribed, [{ epoch: "k3f9", offset: 3, recovered: false }]);
  assert.ok(herald.timers[sub.timer], "sub_refresh is scheduled");

  sub._refresh();
  await tick();
  const refresh = JSON.parse(ws.sent.at(-1));
  assert.deepEqual(refresh.sub_refresh, { channel: "private:room", token: "fresh2" });
  ws.receive(fixture("server", "sub_refresh").replace('"id":12', `"id":${refresh.id}`));

  ws.receive(fixture("server", "push_unsubscribe_expired"));
  await tick();
  const again = JSON.parse(ws.sent.at(-1));
  assert.deepEqual(again.subscribe, { channel: "private:room", recover: true, epoch: "k3f9", offset: 3, token: "fresh3" });
  assert.equal(herald.subs.get("private:room"), sub);

  // Without getToken, the app is told, with the code.
  const ended = [];
  herald.subscribe("private:other", { token: "t", onUnsubscribed: (u) => ended.push(u) });
  ws.receive(`{"id":${JSON.parse(ws.sent.at(-1)).id},"subscribe":{"epoch":"e","offset":0,"expires":1790000000}}`);
  ws.receive(fixture("server", "push_unsubscribe_expired").replace("private:room", "private:other"));
  assert.deepEqual(ended, [{ code: 117, reason: "subscription token expired" }]);
  assert.equal(herald.subs.has("private:other"), false);
  herald.disconnect();
});

test("subscription getToken: a failure is retried with backoff; a refused kept token is replaced once", async () => {
  const { herald, ws } = await connected({ backoffBase: 20, backoffMax: 40 });
  ws.receive(fixture("server", "connect"));
  await tick();
  let calls = 0;
  const errors = [];
  herald.subscribe("private:a", {
    getToken: async () => {
      if (++calls === 1) throw new Error("down");
      return `fresh${calls}`;
    },
    onError: (e) => errors.push(e.code),
  });
  await new Promise((r) => setTimeout(r, 100));
  assert.deepEqual(errors, [HeraldError.TOKEN]);
  assert.deepEqual(JSON.parse(ws.sent.at(-1)).subscribe, { channel: "private:a", token: "fresh2" });

  herald.subscribe("private:b", { token: "kept", getToken: async () => "new", onError: (e) => errors.push(e.code) });
  const kept = JSON.parse(ws.sent.at(-1));
  assert.equal(kept.subscribe.token, "kept");
  ws.receive(`{"id":${kept.id},"error":{"code":101,"message":"unauthorized"}}`);
  await tick();
  const fresh = JSON.parse(ws.sent.at(-1));
  assert.equal(fresh.subscribe.token, "new");
  ws.receive(`{"id":${fresh.id},"error":{"code":101,"message":"unauthorized"}}`);
  assert.deepEqual(errors, [HeraldError.TOKEN, 101], "a fresh token refused is final");
  assert.equal(herald.subs.has("private:b"), false);
  herald.disconnect();
});

test("a recovered subscribe reply delivers the missed publications once, in order", async () => {
  const { herald, ws } = await connected();
  ws.receive(fixture("server", "connect"));
  await tick();
  const pubs = [];
  const subscribed = [];
  herald.subscribe("chat:lobby", { onPublication: (p) => pubs.push(p), onSubscribed: (s) => subscribed.push(s) });
  ws.receive(`{"id":2,"subscribe":{"epoch":"k3f9","offset":41}}`);
  await tick();
  ws.drop(1006);
  await new Promise((r) => setTimeout(r, 400));
  const ws2 = ScriptedSocket.last;
  ws2.receive(fixture("server", "connect"));
  await tick();
  ws2.receive(fixture("server", "subscribe_recovered").replace(`"id":3`, `"id":2`));
  await tick();
  const expected = JSON.parse(fixture("server", "subscribe_recovered")).subscribe.publications;
  assert.deepEqual(pubs, expected);
  assert.deepEqual(subscribed.at(-1), { epoch: "k3f9", offset: 44, recovered: true });
  herald.disconnect();
});

test("requests beyond maxPending fail clearly, queued ones time out, and none run when closed", async () => {
  const herald = new Herald("ws://x/connect", { WebSocket: class extends ScriptedSocket {}, maxPending: 3, timeout: 200 });
  await assert.rejects(herald.publish("a", 1), (e) => e instanceof HeraldError && e.code === HeraldError.CLOSED);
  herald.connect(); // the scripted server never answers connect
  const queued = [1, 2, 3].map((n) => herald.publish("a", n));
  await assert.rejects(herald.publish("a", 4), (e) => e.code === HeraldError.QUEUE_FULL && /3 requests/.test(e.message));
  for (const p of queued) await assert.rejects(p, (e) => e.code === HeraldError.TIMEOUT);
  assert.equal(herald.queue.length, 0);
  herald.disconnect();
});

test("close codes: which ones end reconnecting", () => {
  for (const code of [1000, 1002, 1003, 1007, 1009, 4500, 4503, 4999]) assert.equal(isTerminal(code), true, code);
  for (const code of [1001, 1006, 1011, 4000, 4001, 4002, 4003, 4004, 4005, 4499]) assert.equal(isTerminal(code), false, code);
});

test("tokenExpiry reads exp from a JWT and nothing from garbage", () => {
  const b64 = (o) => Buffer.from(JSON.stringify(o)).toString("base64url");
  assert.equal(tokenExpiry(`${b64({ alg: "HS256" })}.${b64({ sub: "ü?>", exp: 1790000000 })}.sig`), 1790000000);
  assert.equal(tokenExpiry("eyJhbGciOiJIUzI1NiJ9.e30.sig"), undefined);
  assert.equal(tokenExpiry("not a token"), undefined);
});

test("the module is at most 8 KB gzipped and has no imports", () => {
  const source = readFileSync(new URL("../herald.js", import.meta.url));
  const size = gzipSync(source, { level: 9 }).length;
  assert.ok(size <= 8192, `herald.js is ${size} bytes gzipped`);
  assert.doesNotMatch(source.toString(), /^\s*import\s/m);
});

test("the fixtures this file reads are all the fixtures there are", () => {
  const names = (side) => readdirSync(new URL(`${side}/`, fixtures)).sort();
  assert.deepEqual(names("client"), [
    "connect.json", "history.json", "pong.json", "presence.json", "presence_stats.json", "publish.json",
    "refresh.json", "sub_refresh.json", "subscribe.json", "subscribe_recover.json", "subscribe_token.json",
    "unsubscribe.json",
  ]);
  assert.deepEqual(names("server"), [
    "connect.json", "connect_subscriptions.json", "error.json", "error_without_id.json", "history.json",
    "ping.json", "presence.json", "presence_stats.json", "publish.json", "push_join.json", "push_leave.json",
    "push_pub.json", "push_subscribe.json", "push_unsubscribe.json", "push_unsubscribe_expired.json",
    "refresh.json", "sub_refresh.json", "subscribe.json", "subscribe_recovered.json", "subscribe_token.json",
    "unsubscribe.json",
  ]);
});

test("a URL the WebSocket refuses ends connecting, with an error", async () => {
  class Refusing {
    constructor(url) {
      throw new SyntaxError(`invalid URL: ${url}`);
    }
  }
  const herald = new Herald("nonsense", { WebSocket: Refusing });
  const events = [];
  for (const e of ["connecting", "error", "disconnected"]) herald.on(e, (ctx) => events.push([e, ctx]));
  herald.connect();
  assert.equal(herald.state, "disconnected");
  assert.deepEqual(events.map(([e]) => e), ["connecting", "error", "disconnected"]);
  assert.match(events[1][1].message, /invalid URL: nonsense/);
  assert.equal(events[2][1].reconnect, false);
});

test("disconnect() then connect() while getToken is pending opens one connection", async () => {
  let release;
  const sockets = [];
  class Counting extends ScriptedSocket {
    constructor(...args) {
      super(...args);
      sockets.push(this);
    }
  }
  const herald = new Herald("ws://x/connect", {
    WebSocket: Counting,
    getToken: () => new Promise((r) => (release = r)),
  });
  herald.connect();
  const first = release;
  herald.disconnect();
  herald.connect();
  first("old");
  release("new");
  await tick();
  assert.equal(sockets.length, 1);
  assert.match(sockets[0].sent[0], /"token":"new"/);
  herald.disconnect();
});

test("a clock far ahead of the token issuer's does not refresh in a tight loop", async () => {
  const b64 = (o) => Buffer.from(JSON.stringify(o)).toString("base64url");
  // Already expired by this clock, yet the server (whose clock is right) accepts it.
  const stale = `${b64({ alg: "HS256" })}.${b64({ sub: "u", exp: Math.floor(Date.now() / 1000) - 600 })}.sig`;
  let calls = 0;
  const { herald, ws } = await connected({ getToken: async () => (calls++, stale) });
  ws.receive(fixture("server", "connect"));
  const refreshes = () => ws.sent.filter((f) => f.includes('"refresh"'));
  const answer = () => {
    for (const f of refreshes().slice(answered)) ws.receive(`{"id":${JSON.parse(f).id},"refresh":{"expires":1}}`);
    answered = refreshes().length;
  };
  let answered = 0;
  const until = Date.now() + 2500;
  while (Date.now() < until) {
    answer();
    await new Promise((r) => setTimeout(r, 20));
  }
  assert.ok(refreshes().length >= 1, "refreshed");
  assert.ok(refreshes().length <= 3, `${refreshes().length} refreshes in 2.5 s`);
  assert.ok(calls <= 4, `getToken called ${calls} times`);
  herald.disconnect();
});

test("a subscription refused with 113 is kept and tried again; with 103 it is dropped", async () => {
  const { herald, ws } = await connected();
  ws.receive(fixture("server", "connect"));
  await tick();
  const errors = [];
  herald.subscribe("a", { onError: (e) => errors.push(e.code) });
  herald.subscribe("b", { onError: (e) => errors.push(e.code) });
  ws.receive(`{"id":2,"error":{"code":113,"message":"unavailable"}}`);
  ws.receive(`{"id":3,"error":{"code":103,"message":"permission denied"}}`);
  assert.deepEqual(errors, [113, 103]);
  assert.deepEqual([...herald.subs.keys()], ["a"]);
  ws.drop(1001);
  await new Promise((r) => setTimeout(r, 400));
  const ws2 = ScriptedSocket.last;
  ws2.receive(fixture("server", "connect"));
  await tick();
  assert.equal(ws2.sent.at(-1), `{"id":2,"subscribe":{"channel":"a"}}`);
  herald.disconnect();
});

test("the shutdown close's reconnect hint is read and capped", () => {
  assert.equal(reconnectHint(1001, "server shutting down; reconnect_in=1234"), 1234);
  assert.equal(reconnectHint(1001, "reconnect_in=0"), 0);
  assert.equal(reconnectHint(1001, "reconnect_in=99999999"), MAX_RECONNECT_HINT);
  assert.equal(reconnectHint(1001, "reconnect_in=99999999999999999999999999999999999"), MAX_RECONNECT_HINT);
  assert.equal(reconnectHint(1001, "reconnect_in=-5"), undefined);
  assert.equal(reconnectHint(1001, "server shutting down"), undefined);
  assert.equal(reconnectHint(4001, "reconnect_in=1000"), undefined, "only on 1001");
});
