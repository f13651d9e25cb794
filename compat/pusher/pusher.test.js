// The unmodified pusher-js, pusher (Node server SDK), laravel-echo and PyPI `pusher` against a
// real Herald: what an app moving from Pusher, Soketi or Reverb does, by changing a host name.

import { execFile } from "node:child_process";
import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import { promisify } from "node:util";
import PusherJsModule from "pusher-js";
import Echo from "laravel-echo";
import { Centrifuge } from "centrifuge";
import WebSocket from "ws";
import { Backend, Herald, waitFor, sleep } from "./harness.js";

const PusherJs = PusherJsModule.default ?? PusherJsModule;
const PYTHON = process.env.PUSHER_PYTHON || "python3";
const run = promisify(execFile);

let herald;
let backend;
const clients = [];

before(async () => {
  herald = await new Herald().start();
  backend = await new Backend(herald.sdk).start();
});

after(async () => {
  for (const c of clients) c.disconnect();
  await backend.stop();
  await herald.stop();
});

function client(user) {
  const c = new PusherJs("app-key", herald.clientOptions(backend, user));
  clients.push(c);
  return c;
}

/** Resolves once `channel` is subscribed; rejects on a subscription error. */
function subscribed(channel) {
  return new Promise((ok, fail) => {
    channel.bind("pusher:subscription_succeeded", ok);
    channel.bind("pusher:subscription_error", (e) => fail(new Error(`subscription error: ${JSON.stringify(e)}`)));
  });
}

/** Collects the events named `name` on `channel`. */
function collect(channel, name) {
  const got = [];
  channel.bind(name, (data, meta) => got.push({ data, meta }));
  return got;
}

async function python(...args) {
  const { stdout } = await run(PYTHON, ["python_sdk.py", String(herald.port), ...args], { cwd: import.meta.dirname });
  return JSON.parse(stdout);
}

test("pusher-js receives events from the Node SDK, the Python SDK and Herald's own API", async () => {
  const c = client();
  const news = c.subscribe("news");
  await subscribed(news);
  assert.match(c.connection.socket_id, /^\d+\.\d+$/);
  const greets = collect(news, "greet");
  const messages = collect(news, "message");
  await herald.sdk.trigger("news", "greet", { from: "node" });
  assert.deepEqual(await python("trigger", "news", "greet", JSON.stringify({ from: "python" })), { ok: true });
  await herald.api("publish", { channel: "news", data: { from: "herald" } });
  await waitFor(() => greets.length === 2 && messages.length === 1, "three events");
  assert.deepEqual(
    greets.map((g) => g.data),
    [{ from: "node" }, { from: "python" }],
  );
  assert.deepEqual(messages[0].data, { from: "herald" });
});

test("private channels are authorized by the app's backend (pusher SDK authorizeChannel)", async () => {
  const before = backend.authorized;
  const c = client("u1");
  const box = c.subscribe("private-box");
  await subscribed(box);
  assert.ok(backend.authorized > before, "the auth endpoint was asked");
  const got = collect(box, "note");
  await herald.sdk.trigger("private-box", "note", "plain text");
  await waitFor(() => got.length === 1, "the private event");
  assert.equal(got[0].data, "plain text");

  // No user: the backend refuses, pusher-js reports it, the channel stays unsubscribed.
  const stranger = client();
  const err = await new Promise((ok) => stranger.subscribe("private-box").bind("pusher:subscription_error", ok));
  assert.equal(err.status, 403);
});

test("Laravel Echo sees presence members come and go; whispers reach the others", async () => {
  const echo = (user) => {
    const e = new Echo({ broadcaster: "pusher", key: "app-key", Pusher: PusherJs, ...herald.clientOptions(backend, user) });
    clients.push(e.connector.pusher);
    return e;
  };
  const ann = echo("1");
  let here = null;
  const joining = [];
  const leaving = [];
  const whispers = [];
  ann
    .join("room")
    .here((users) => (here = users))
    .joining((u) => joining.push(u))
    .leaving((u) => leaving.push(u))
    .listenForWhisper("typing", (e) => whispers.push(e));
  await waitFor(() => here !== null, "Ann's member list");
  assert.deepEqual(here, [{ name: "user 1" }]);

  const bob = echo("2");
  let bobHere = null;
  const bobWhispers = [];
  const room = bob
    .join("room")
    .here((users) => (bobHere = users))
    .listenForWhisper("typing", (e) => bobWhispers.push(e));
  await waitFor(() => bobHere !== null && joining.length === 1, "Bob in the room");
  assert.equal(bobHere.length, 2);
  assert.deepEqual(joining, [{ name: "user 2" }]);

  // Python sees both members through the HTTP API.
  assert.deepEqual(await python("users", "presence-room"), { users: [{ id: "1" }, { id: "2" }] });
  const info = await python("info", "presence-room");
  assert.equal(info.user_count, 2);
  assert.equal(info.occupied, true);

  room.whisper("typing", { who: "bob" });
  await waitFor(() => whispers.length === 1, "Ann hears Bob's whisper");
  assert.deepEqual(whispers[0], { who: "bob" });
  await sleep(200);
  assert.equal(bobWhispers.length, 0, "a client event is not echoed to its sender");

  bob.disconnect();
  await waitFor(() => leaving.length === 1, "Bob leaves");
  assert.deepEqual(leaving, [{ name: "user 2" }]);
});

test("client events, socket_id exclusion, signin and terminate_connections", async () => {
  const a = client("7");
  const b = client("8");
  const [ca, cb] = [a.subscribe("private-chat"), b.subscribe("private-chat")];
  await Promise.all([subscribed(ca), subscribed(cb)]);
  const onB = collect(cb, "client-ping");
  const onA = collect(ca, "client-ping");
  assert.equal(ca.trigger("client-ping", { n: 1 }), true);
  await waitFor(() => onB.length === 1, "the client event");
  assert.deepEqual(onB[0].data, { n: 1 });

  const newsA = collect(ca, "news");
  const newsB = collect(cb, "news");
  await herald.sdk.trigger("private-chat", "news", { n: 2 }, { socket_id: a.connection.socket_id });
  await waitFor(() => newsB.length === 1, "the event for b");
  await sleep(200);
  assert.equal(newsA.length, 0, "the excluded socket does not get it");
  assert.equal(onA.length, 0);

  // Signed-in users get events sent to them, and can be cut off by the app.
  a.signin();
  await a.user.signinDonePromise;
  assert.equal(a.user.user_data?.id, "7", "signed in");
  const personal = [];
  a.user.bind("hello", (data) => personal.push(data));
  await waitFor(() => a.user.serverToUserChannel?.subscribed, "the user channel");
  await herald.sdk.sendToUser("7", "hello", { only: "for 7" });
  await waitFor(() => personal.length === 1, "the event for user 7");
  assert.deepEqual(personal[0], { only: "for 7" });
  await herald.sdk.terminateUserConnections("7");
  await waitFor(() => a.connection.state !== "connected", "a's connection is terminated");
  assert.equal(b.connection.state, "connected", "other users stay");
});

test("one core, several doors: a Pusher API event reaches a centrifuge-js subscriber", async () => {
  // centrifuge-js (unmodified, from npm) on Herald's Centrifugo door, pusher-js on the Pusher
  // door, both on channel `doors`; the event is triggered with the unmodified `pusher` SDK.
  const centrifuge = new Centrifuge(`ws://127.0.0.1:${herald.port}/connection/websocket`, { websocket: WebSocket });
  const got = [];
  const sub = centrifuge.newSubscription("doors");
  sub.on("publication", (ctx) => got.push(ctx));
  const ready = new Promise((ok, fail) => {
    sub.on("subscribed", ok);
    sub.on("error", (e) => fail(new Error(`centrifuge subscription error: ${JSON.stringify(e)}`)));
  });
  centrifuge.connect();
  sub.subscribe();
  await ready;
  const p = client();
  const doors = p.subscribe("doors");
  await subscribed(doors);
  const greets = collect(doors, "greet");
  try {
    await herald.sdk.trigger("doors", "greet", { from: "pusher api" });
    await waitFor(() => got.length === 1 && greets.length === 1, "the event on both doors");
    assert.deepEqual(got[0].data, { from: "pusher api" });
    assert.equal(got[0].tags?.event, "greet", "the Pusher event name travels as a tag");
    assert.deepEqual(greets[0].data, { from: "pusher api" });
    // And back: Herald's own API reaches both.
    await herald.api("publish", { channel: "doors", data: { from: "herald" } });
    await waitFor(() => got.length === 2, "Herald's publication on the Centrifugo door");
    assert.deepEqual(got[1].data, { from: "herald" });
    assert.ok(got[1].offset > got[0].offset, "one stream, one order");
  } finally {
    centrifuge.disconnect();
  }
});
