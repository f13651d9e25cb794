// The SDK against a real Herald (spawned from HERALD_BIN) over real sockets on 127.0.0.1.

import assert from "node:assert/strict";
import { after, before, test } from "node:test";
import WebSocket from "ws";

import { Herald, HeraldError } from "../herald.js";
import { Server, sleep, token, waitFor } from "./herald-server.js";

let server;
const clients = [];

before(async () => {
  server = await new Server().start();
});

after(async () => {
  for (const c of clients) c.disconnect();
  await server.stop();
});

// A connected client; fast backoff so that reconnects happen within a test.
async function client(options = {}) {
  const herald = new Herald(options.url || server.url, { WebSocket, backoffBase: 20, backoffMax: 300, ...options });
  clients.push(herald);
  herald.events = [];
  for (const e of ["connecting", "connected", "disconnected", "error"]) herald.on(e, (ctx) => herald.events.push([e, ctx]));
  herald.connect();
  await waitFor(() => herald.state === "connected", "connected");
  return herald;
}

// Subscribes and records everything the subscription reports; resolves once subscribed.
async function subscribe(herald, channel, options = {}) {
  const seen = { pubs: [], joins: [], leaves: [], resets: [], subscribed: [], errors: [], unsubscribed: [] };
  seen.sub = herald.subscribe(channel, {
    ...options,
    onPublication: (p) => seen.pubs.push(p),
    onJoin: (i) => seen.joins.push(i),
    onLeave: (i) => seen.leaves.push(i),
    onReset: (r) => seen.resets.push(r),
    onSubscribed: (s) => seen.subscribed.push(s),
    onError: (e) => seen.errors.push(e),
    onUnsubscribed: (u) => seen.unsubscribed.push(u),
  });
  await waitFor(() => seen.subscribed.length > 0 || seen.errors.length > 0, `subscribed to ${channel}`);
  return seen;
}

const datas = (seen) => seen.pubs.map((p) => p.data);
const range = (from, to) => Array.from({ length: to - from + 1 }, (_, i) => from + i);

test("connect, subscribe, and receive publications from the API and from the SDK", async () => {
  const herald = await client({ name: "js-test" });
  assert.match(herald.client, /\S/);
  const seen = await subscribe(herald, "chat:connect");
  assert.deepEqual(seen.subscribed, [{ epoch: seen.subscribed[0].epoch, offset: 0, recovered: false }]);

  await server.api("publish", { channel: "chat:connect", data: { n: 1 } });
  const reply = await herald.publish("chat:connect", { n: 2 });
  assert.equal(reply.offset, 2);
  assert.equal(reply.epoch, seen.subscribed[0].epoch);
  await waitFor(() => seen.pubs.length === 2, "two publications");
  assert.deepEqual(datas(seen), [{ n: 1 }, { n: 2 }]);
  assert.deepEqual(seen.pubs.map((p) => p.offset), [1, 2]);
  assert.equal(seen.pubs[0].info, undefined, "the API publishes without client info");
  assert.equal(seen.pubs[1].info.client, herald.client);

  // Refusals are HeraldErrors with the protocol's codes, and the connection goes on.
  await assert.rejects(herald.publish("news", 1), (e) => e instanceof HeraldError && e.code === 103);
  const bad = await subscribe(herald, "nope:x");
  assert.equal(bad.errors[0].code, 102);
  assert.equal(herald.subs.has("nope:x"), false);
  assert.throws(() => herald.subscribe("chat:connect"), (e) => e.code === 105);
  assert.equal(herald.state, "connected");

  seen.sub.unsubscribe();
  await herald.publish("chat:connect", { n: 3 }); // replies come in order: the unsubscribe is done
  await sleep(50);
  assert.equal(seen.pubs.length, 2, "nothing after unsubscribe");
  assert.deepEqual(herald.events.filter(([e]) => e === "disconnected"), []);
});

test("history, presence, presenceStats, join and leave", async () => {
  const ada = await client({ token: token("ada", 3600, { name: "Ada" }) });
  const seen = await subscribe(ada, "chat:room");
  for (const n of range(1, 5)) await ada.publish("chat:room", n);

  const all = await ada.history("chat:room");
  assert.deepEqual(all.publications.map((p) => p.data), range(1, 5));
  assert.equal(all.offset, 5);
  const since = await ada.history("chat:room", { limit: 10, since: { epoch: all.epoch, offset: 3 } });
  assert.deepEqual(since.publications.map((p) => p.offset), [4, 5]);
  const reverse = await ada.history("chat:room", { reverse: true });
  assert.deepEqual(reverse.publications.map((p) => p.offset), [5, 4, 3, 2, 1]);

  const bob = await client({ token: token("bob") });
  const bobs = await subscribe(bob, "chat:room");
  // Each user joins once: ada (her own join), then bob.
  await waitFor(() => seen.joins.length === 2, "bob's join");
  assert.deepEqual(seen.joins, [{ user: "ada", client: ada.client }, { user: "bob", client: bob.client }]);

  const presence = await bob.presence("chat:room");
  assert.deepEqual(Object.keys(presence.clients).sort(), [ada.client, bob.client].sort());
  assert.deepEqual(presence.clients[ada.client].info, { name: "Ada" });
  assert.deepEqual(await bob.presenceStats("chat:room"), { clients: 2, users: 2 });
  await assert.rejects(bob.presence("news"), (e) => e.code === 109);

  bobs.sub.unsubscribe();
  await waitFor(() => seen.leaves.length === 1, "bob's leave");
  assert.equal(seen.leaves[0].user, "bob");
  assert.deepEqual(await ada.presenceStats("chat:room"), { clients: 1, users: 1 });
});

test("dropped connections reconnect and recover: every publication once, in order", async () => {
  const herald = await client({ token: token("carol") });
  const seen = await subscribe(herald, "chat:recover");
  const drops = () => herald.events.filter(([e, c]) => e === "disconnected" && c.code === 4000).length;
  // A publisher keeps publishing while the server closes the client's connection three times
  // with a "reconnect and recover" code: publications happen while it is away, while it
  // resubscribes, and while it is connected.
  let n = 0;
  let stop = false;
  const publisher = (async () => {
    while (!stop && n < 600) {
      await server.api("publish", { channel: "chat:recover", data: ++n });
      await sleep(2);
    }
  })();
  try {
    for (let round = 1; round <= 3; round++) {
      const at = n;
      await waitFor(() => n >= at + 20, "publications before the drop");
      assert.deepEqual(await server.api("disconnect", { user: "carol", code: 4000, reason: "test" }), { connections: 1 });
      await waitFor(() => drops() === round && herald.state === "connected", `reconnect ${round}`);
    }
    const at = n;
    await waitFor(() => n >= at + 20, "publications after the last reconnect");
  } finally {
    stop = true;
    await publisher;
  }
  await waitFor(() => seen.pubs.length >= n, `${n} publications`);
  await sleep(100);
  assert.deepEqual(datas(seen), range(1, n));
  assert.deepEqual(seen.pubs.map((p) => p.offset), range(1, n));
  assert.deepEqual(seen.resets, []);
  assert.equal(seen.subscribed.filter((s) => s.recovered).length, 3, "resubscribed with recovery each time");
  const gone = herald.events.find(([e, c]) => e === "disconnected" && c.code === 4000)[1];
  assert.deepEqual(gone, { code: 4000, reason: "test", reconnect: true });
});

test("a conflated subscription gets the newest at max_rate, offsets jump, and recovery brings no backlog", async () => {
  const herald = await client({ token: token("erin") });
  const seen = await subscribe(herald, "ticks:eur");
  assert.equal(seen.subscribed[0].conflated, true);
  assert.equal(seen.sub.conflated, true);
  const N = 150;
  const started = Date.now();
  for (let i = 1; i <= N; i++) await server.api("publish", { channel: "ticks:eur", data: i });
  await waitFor(() => seen.pubs.at(-1)?.data === N, "the newest value");
  const live = seen.pubs.length;
  // Bounded by max_rate (20/s) plus the first, never every publication.
  assert.ok(live <= ((Date.now() - started) / 1000) * 20 + 2, `${live} deliveries`);
  assert.ok(live < N, `conflated: ${live} of ${N}`);

  // Dropped and reconnected while more is published: the newest comes back, not a backlog.
  const drops = () => herald.events.filter(([e, c]) => e === "disconnected" && c.code === 4000).length;
  assert.deepEqual(await server.api("disconnect", { user: "erin", code: 4000, reason: "test" }), { connections: 1 });
  for (let i = N + 1; i <= 2 * N; i++) await server.api("publish", { channel: "ticks:eur", data: i });
  await waitFor(() => drops() === 1 && herald.state === "connected", "reconnected");
  await waitFor(() => seen.pubs.at(-1)?.data === 2 * N, "the newest value after the reconnect");
  assert.ok(seen.pubs.length - live < N / 2, `no backlog: ${seen.pubs.length - live} after the reconnect`);

  const offsets = seen.pubs.map((p) => p.offset);
  assert.ok(offsets.every((o, i) => i === 0 || o > offsets[i - 1]), "increasing offsets");
  assert.ok(seen.pubs.every((p) => p.data === p.offset), "each value is the one published at its offset");
  assert.ok(seen.pubs.every((p) => p.conflated === true), "every push says it is conflated");
  assert.deepEqual(seen.resets, [], "a jump is not a gap: no reset");
  assert.equal(seen.subscribed.at(-1).recovered, true);
  assert.deepEqual((await herald.history("ticks:eur", { limit: 2 * N })).publications.length, 2 * N, "history keeps all");
});

test("a terminal close code (4503) stops reconnecting", async () => {
  const herald = await client({ token: token("dave") });
  await server.api("disconnect", { user: "dave" });
  await waitFor(() => herald.state === "disconnected", "disconnected");
  const connecting = herald.events.filter(([e]) => e === "connecting").length;
  await sleep(600); // longer than the largest backoff
  assert.equal(herald.events.filter(([e]) => e === "connecting").length, connecting);
  assert.deepEqual(herald.events.at(-1), ["disconnected", { code: 4503, reason: herald.events.at(-1)[1].reason, reconnect: false }]);
  await assert.rejects(herald.publish("chat:x", 1), (e) => e.code === HeraldError.CLOSED);
});

test("a refused connect (bad token) is an error and ends connecting", async () => {
  const forged = token("mallory").replace(/\.[^.]*$/, ".AAAA");
  const herald = new Herald(server.url, { WebSocket, token: forged, backoffBase: 20, backoffMax: 300 });
  const events = [];
  for (const e of ["connecting", "connected", "error", "disconnected"]) herald.on(e, (ctx) => events.push([e, ctx]));
  herald.connect();
  await waitFor(() => herald.state === "disconnected", "disconnected");
  await sleep(400);
  assert.deepEqual(events.map(([e]) => e), ["connecting", "error", "disconnected"]);
  assert.equal(events[1][1].code, 101);
  assert.equal(events[2][1].reconnect, false);
});

test("a kept token the server refuses is replaced once from getToken; a fresh one refused is final", async () => {
  const forged = token("erin").replace(/\.[^.]*$/, ".AAAA");
  let calls = 0;
  const good = new Herald(server.url, { WebSocket, token: forged, getToken: async () => (calls++, token("erin")), backoffBase: 20, backoffMax: 300 });
  good.connect();
  await waitFor(() => good.state === "connected", "connected with the fresh token");
  assert.equal(calls, 1);
  good.disconnect();

  let tries = 0;
  const bad = new Herald(server.url, { WebSocket, getToken: async () => (tries++, forged), backoffBase: 20, backoffMax: 300 });
  bad.connect();
  await waitFor(() => bad.state === "disconnected", "disconnected");
  await sleep(400);
  assert.equal(tries, 1);
  assert.equal(bad.state, "disconnected");
});

test("disconnect() closes for good; connect() again resubscribes", async () => {
  const herald = await client();
  const seen = await subscribe(herald, "chat:again");
  herald.disconnect();
  assert.equal(herald.state, "disconnected");
  await server.api("publish", { channel: "chat:again", data: "while away" });
  await sleep(300);
  assert.equal(herald.events.filter(([e]) => e === "connecting").length, 1);
  herald.connect();
  await waitFor(() => seen.pubs.length === 1, "the missed publication, recovered");
  assert.deepEqual(datas(seen), ["while away"]);
});

test("tokens are refreshed through getToken before they expire", async () => {
  let calls = 0;
  const herald = await client({ getToken: async () => (calls++, token("erin", 3)) });
  const seen = await subscribe(herald, "chat:refresh");
  // Herald closes a connection whose token expired (4005) at its next ping; 3 s tokens
  // would be closed within this wait without refreshes.
  await sleep(7000);
  await server.api("publish", { channel: "chat:refresh", data: "still here" });
  await waitFor(() => seen.pubs.length === 1, "the publication");
  assert.deepEqual(herald.events.filter(([e]) => e === "disconnected" || e === "error"), []);
  assert.ok(calls >= 3, `getToken called ${calls} times`);
});

test("after a failed refresh, 4005 reconnects with a fresh token", async () => {
  let calls = 0;
  const getToken = async () => {
    if (++calls === 2) throw new Error("token service down");
    return token("frank", calls === 1 ? 2 : 3600);
  };
  const herald = await client({ getToken });
  const seen = await subscribe(herald, "chat:expired");
  await waitFor(() => herald.events.some(([e, c]) => e === "disconnected" && c.code === 4005), "4005", 15000);
  await waitFor(() => herald.state === "connected", "reconnected");
  const errors = herald.events.filter(([e]) => e === "error").map(([, err]) => err);
  assert.equal(errors[0].code, HeraldError.TOKEN);
  assert.match(errors[0].message, /token service down/);
  await server.api("publish", { channel: "chat:expired", data: 1 });
  await waitFor(() => seen.pubs.length === 1, "a publication after the reconnect");
  assert.equal(calls, 3);
});

test("a dead link (no ping within ping + margin) is detected and replaced", async () => {
  const herald = await client({ pingMargin: 300, timeout: 1000 });
  const seen = await subscribe(herald, "chat:dead");
  server.proc.kill("SIGSTOP"); // the server stops answering, the TCP connection stays open
  try {
    await waitFor(() => herald.events.some(([e, c]) => e === "disconnected" && /nothing from the server/.test(c.reason)), "dead link");
  } finally {
    server.proc.kill("SIGCONT");
  }
  await waitFor(() => herald.state === "connected", "reconnected");
  await server.api("publish", { channel: "chat:dead", data: "back" });
  await waitFor(() => seen.pubs.length === 1, "a publication after the reconnect");
  assert.deepEqual(seen.resets, []);
});

test("after a server restart the subscription is reset, then goes on", async () => {
  const own = await new Server().start();
  try {
    const herald = await client({ url: own.url });
    const seen = await subscribe(herald, "chat:restart");
    await own.api("publish", { channel: "chat:restart", data: "before" });
    await waitFor(() => seen.pubs.length === 1, "the first publication");
    await own.stop();
    await waitFor(() => herald.events.some(([e, c]) => e === "disconnected" && c.code === 1001), "1001");
    await own.start();
    await waitFor(() => seen.resets.length === 1, "onReset", 15000);
    assert.notEqual(seen.resets[0].epoch, seen.subscribed[0].epoch);
    assert.deepEqual(seen.subscribed.at(-1), { ...seen.resets[0], recovered: false });
    await own.api("publish", { channel: "chat:restart", data: "after" });
    await waitFor(() => seen.pubs.length === 2, "a publication after the restart");
    assert.deepEqual(datas(seen), ["before", "after"]);
    herald.disconnect();
  } finally {
    await own.stop();
  }
});

// Publishes 1, 2, 3... to `channel` through the API until stop() (returns the count).
function publisher(channel) {
  let n = 0;
  let stop = false;
  const done = (async () => {
    while (!stop && n < 2000) {
      await server.api("publish", { channel, data: ++n });
      await sleep(10);
    }
  })();
  return {
    get n() {
      return n;
    },
    stop: async () => ((stop = true), await done, n),
  };
}

const subToken = (user, ttl) => (channel) => token(user, ttl, undefined, { channel });

test("a subscription token is refreshed through getToken before it expires: no publication lost", async () => {
  const herald = await client({ token: token("tina") });
  const calls = [];
  const mint = subToken("tina", 3);
  const seen = await subscribe(herald, "token:refresh", { getToken: async (channel) => (calls.push(channel), mint(channel)) });
  assert.deepEqual(seen.errors, []);
  const pub = publisher("token:refresh");
  // Without sub_refresh the subscription would end (117) within 4 s: 3 s tokens, 1 s leeway.
  await sleep(8000);
  const n = await pub.stop();
  await waitFor(() => seen.pubs.length >= n, `${n} publications`);
  await sleep(100);
  assert.deepEqual(datas(seen), range(1, n));
  assert.equal(seen.subscribed.length, 1, "never subscribed again: refreshed in place");
  assert.deepEqual([seen.unsubscribed, seen.errors, seen.resets], [[], [], []]);
  assert.ok(calls.length >= 3, `getToken called ${calls.length} times`);
  assert.deepEqual(new Set(calls), new Set(["token:refresh"]));
  assert.deepEqual(herald.events.filter(([e]) => e === "disconnected" || e === "error"), []);
});

test("an expired subscription token (refresh failed) is replaced and the gap recovered", async () => {
  const herald = await client({ token: token("uma") });
  let calls = 0;
  const getToken = async (channel) => {
    if (++calls === 2) throw new Error("token service down");
    return token("uma", calls === 1 ? 2 : 3600, undefined, { channel });
  };
  const seen = await subscribe(herald, "token:expire", { getToken });
  const pub = publisher("token:expire");
  try {
    await waitFor(() => seen.subscribed.length === 2, "subscribed again after 117", 15000);
    const at = pub.n;
    await waitFor(() => pub.n >= at + 20, "publications after the resubscribe");
  } finally {
    await pub.stop();
  }
  await waitFor(() => seen.pubs.length >= pub.n, `${pub.n} publications`);
  await sleep(100);
  assert.deepEqual(datas(seen), range(1, pub.n));
  assert.equal(seen.errors.length, 1);
  assert.equal(seen.errors[0].code, HeraldError.TOKEN);
  assert.match(seen.errors[0].message, /token service down/);
  assert.deepEqual(seen.subscribed[1].recovered, true);
  assert.deepEqual([seen.unsubscribed, seen.resets], [[], []]);
  assert.equal(calls, 3);
  assert.equal(herald.state, "connected");
});

test("without getToken, an expired subscription token ends it with onUnsubscribed 117", async () => {
  const herald = await client({ token: token("vic") });
  const none = await subscribe(herald, "token:none");
  assert.equal(none.errors[0].code, 119, "no token: refused");
  const other = await subscribe(herald, "token:other", { token: token("vic", 60, undefined, { channel: "token:x" }) });
  assert.equal(other.errors[0].code, 101, "a token for another channel: refused");

  const seen = await subscribe(herald, "token:ends", { token: subToken("vic", 1)("token:ends") });
  assert.equal(seen.subscribed.length, 1);
  await waitFor(() => seen.unsubscribed.length === 1, "onUnsubscribed", 10000);
  assert.deepEqual(seen.unsubscribed, [{ code: 117, reason: "subscription token expired" }]);
  assert.equal(herald.subs.has("token:ends"), false, "not resubscribed");
  await server.api("publish", { channel: "token:ends", data: "after" });
  await sleep(200);
  assert.deepEqual(seen.pubs, []);
  assert.equal(herald.state, "connected", "the connection stays");
});

test("server-side subscriptions (the token's channels claim) deliver publications as events", async () => {
  const channels = ["chat:srv-walt", "srv-walt"];
  const events = [];
  const herald = new Herald(server.url, { WebSocket, token: token("walt", 3600, undefined, { channels }), backoffBase: 20, backoffMax: 300 });
  clients.push(herald);
  for (const e of ["connected", "subscribed", "publication", "disconnected"]) herald.on(e, (ctx) => events.push([e, ctx]));
  herald.connect();
  const of = (name) => events.filter(([e]) => e === name).map(([, c]) => c);
  await waitFor(() => of("subscribed").length === 2, "two subscribe pushes");
  assert.deepEqual(of("connected")[0].subscriptions, channels);
  assert.deepEqual(of("subscribed").map((s) => s.channel).sort(), [...channels].sort());
  assert.throws(() => herald.subscribe("srv-walt"), (e) => e.code === 105);

  await server.api("publish", { channel: "srv-walt", data: "one" });
  await server.api("publish", { channel: "chat:srv-walt", data: "two" });
  await waitFor(() => of("publication").length === 2, "two publications");
  assert.deepEqual(
    of("publication").map(({ channel, offset, data }) => ({ channel, offset, data })),
    [{ channel: "srv-walt", offset: 1, data: "one" }, { channel: "chat:srv-walt", offset: 1, data: "two" }],
  );

  // After a reconnect the server subscribes again, and says from where.
  await server.api("disconnect", { user: "walt", code: 4000 });
  await waitFor(() => of("subscribed").length === 4, "subscribed again after the reconnect");
  assert.deepEqual(of("subscribed").slice(2).find((s) => s.channel === "srv-walt").offset, 1);
  await server.api("publish", { channel: "srv-walt", data: "three" });
  await waitFor(() => of("publication").length === 3, "a publication after the reconnect");
  assert.deepEqual(of("publication")[2].data, "three");
});
