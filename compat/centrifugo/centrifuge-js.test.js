// centrifuge-js, unmodified from npm, against a real Herald on /connection/websocket.

import assert from "node:assert/strict";
import { after, before, test } from "node:test";

import { Centrifuge } from "centrifuge";
import WebSocket from "ws";

import { Herald, sleep, token, waitFor } from "./harness.js";

let herald;
const clients = [];

before(async () => {
  herald = await new Herald().start();
});

after(async () => {
  for (const c of clients) c.disconnect();
  await herald.stop();
});

/** A connected centrifuge-js client for `user` (anonymous without one). */
async function connect(user) {
  const options = { websocket: WebSocket, minReconnectDelay: 50, maxReconnectDelay: 500, name: "node-test" };
  if (user) options.getToken = async () => token(user, 3600, { name: user.toUpperCase() });
  const c = new Centrifuge(herald.url, options);
  clients.push(c);
  const connected = new Promise((ok) => c.once("connected", ok));
  c.connect();
  return { client: c, ctx: await connected };
}

/** A subscription that records what it receives. */
async function subscribe(client, channel, options = {}) {
  const sub = client.newSubscription(channel, options);
  const seen = { pubs: [], subscribed: [], joins: [], leaves: [] };
  sub.on("publication", (ctx) => seen.pubs.push(ctx));
  sub.on("subscribed", (ctx) => seen.subscribed.push(ctx));
  sub.on("join", (ctx) => seen.joins.push(ctx.info));
  sub.on("leave", (ctx) => seen.leaves.push(ctx.info));
  sub.subscribe();
  await waitFor(() => seen.subscribed.length === 1, `subscribed to ${channel}`);
  return { sub, seen };
}

test("connects with a token, subscribes, and receives what Herald's API publishes", async () => {
  const { client, ctx } = await connect("42");
  assert.ok(ctx.client, "a client id");
  const { seen } = await subscribe(client, "news");
  assert.equal(seen.subscribed[0].recoverable, true, "channels with history are recoverable");
  for (let n = 1; n <= 3; n++) await herald.api("publish", { channel: "news", data: { n } });
  await waitFor(() => seen.pubs.length === 3, "three publications");
  assert.deepEqual(
    seen.pubs.map((p) => p.data.n),
    [1, 2, 3],
  );
  const offsets = seen.pubs.map((p) => p.offset);
  assert.deepEqual(offsets, [offsets[0], offsets[0] + 1, offsets[0] + 2], "consecutive offsets");
});

test("recovers what it missed after the TCP connection drops", async () => {
  const { client } = await connect("7");
  const { seen } = await subscribe(client, "ticker");
  await herald.api("publish", { channel: "ticker", data: { n: 1 } });
  await waitFor(() => seen.pubs.length === 1, "the first publication");

  const reconnecting = new Promise((ok) => client.once("connecting", ok));
  assert.ok(herald.drop() > 0, "a connection to drop");
  await reconnecting;
  // Published while the client is away: it must get these on its way back, once each.
  for (let n = 2; n <= 5; n++) await herald.api("publish", { channel: "ticker", data: { n } });
  await waitFor(() => seen.subscribed.length === 2, "subscribed again");
  const again = seen.subscribed[1];
  assert.equal(again.wasRecovering, true, "it asked to recover");
  assert.equal(again.recovered, true, "and got everything");
  await waitFor(() => seen.pubs.length === 5, "the missed publications");
  await herald.api("publish", { channel: "ticker", data: { n: 6 } });
  await waitFor(() => seen.pubs.length === 6, "then live");
  assert.deepEqual(
    seen.pubs.map((p) => p.data.n),
    [1, 2, 3, 4, 5, 6],
    "every publication once, in order",
  );
});

test("presence, presence stats, history and client publications", async () => {
  const ada = await connect("ada");
  const a = await subscribe(ada.client, "chat:room", { joinLeave: true });
  const bob = await connect("bob");
  const b = await subscribe(bob.client, "chat:room", { joinLeave: true });

  await waitFor(() => a.seen.joins.some((i) => i.user === "bob"), "bob's join");
  assert.equal(a.seen.joins.find((i) => i.user === "bob").connInfo.name, "BOB", "join carries the token's info");
  const presence = await a.sub.presence();
  const users = Object.values(presence.clients)
    .map((c) => c.user)
    .sort();
  assert.deepEqual(users, ["ada", "bob"]);
  assert.equal(Object.values(presence.clients).find((c) => c.user === "bob").connInfo.name, "BOB");
  const stats = await a.sub.presenceStats();
  assert.deepEqual(stats, { numClients: 2, numUsers: 2 });

  await b.sub.publish({ text: "hi from bob" });
  await waitFor(() => a.seen.pubs.length === 1, "bob's message");
  assert.equal(a.seen.pubs[0].data.text, "hi from bob");
  assert.equal(a.seen.pubs[0].info.user, "bob", "who published");

  const history = await a.sub.history({ limit: 10 });
  assert.equal(history.publications.length, 1);
  assert.equal(history.publications[0].data.text, "hi from bob");
  assert.equal(typeof history.epoch, "string");

  bob.client.disconnect();
  await waitFor(() => a.seen.leaves.some((i) => i.user === "bob"), "bob's leave");

  await assert.rejects(ada.client.rpc("getUser", {}), (e) => e.code === 108, "RPC is not available");
});

test("refreshes short-lived connection and subscription tokens without dropping anything", async () => {
  let connectionTokens = 0;
  let subscriptionTokens = 0;
  const c = new Centrifuge(herald.url, {
    websocket: WebSocket,
    getToken: async () => {
      connectionTokens++;
      return token("carol", 3);
    },
  });
  clients.push(c);
  const connected = new Promise((ok) => c.once("connected", ok));
  c.connect();
  await connected;
  const disconnects = [];
  c.on("disconnected", (ctx) => disconnects.push(ctx));
  c.on("connecting", (ctx) => disconnects.push(ctx));
  const sub = c.newSubscription("private:carol", {
    getToken: async (ctx) => {
      subscriptionTokens++;
      return token("carol", 3, undefined, { channel: ctx.channel });
    },
  });
  const pubs = [];
  sub.on("publication", (ctx) => pubs.push(ctx.data));
  sub.subscribe();
  await waitFor(() => sub.state === "subscribed", "subscribed with a token");
  sub.on("subscribing", (ctx) => disconnects.push(ctx));
  // Both tokens expire after 3 s (+1 s leeway); the SDK refreshes them before that.
  await waitFor(() => connectionTokens >= 3 && subscriptionTokens >= 3, "two refreshes of each", 15000);
  await sleep(500);
  await herald.api("publish", { channel: "private:carol", data: { ok: true } });
  await waitFor(() => pubs.length === 1, "a publication after the refreshes");
  assert.equal(c.state, "connected");
  assert.equal(sub.state, "subscribed");
  assert.deepEqual(disconnects, [], "never disconnected or resubscribed");
});
