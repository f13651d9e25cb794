// pusher-js (its browser build, unmodified, from npm) in headless Chromium against a real
// Herald: a page subscribes to a public and a presence channel, and receives a publication
// made through Herald's own API and an event triggered through the Pusher HTTP API.
import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import { createHash, createHmac } from "node:crypto";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { freePort, launch, publish, shots, startHerald, until } from "./harness.js";

const here = path.dirname(fileURLToPath(import.meta.url));
const PUSHER_JS = path.join(here, "node_modules/pusher-js/dist/web/pusher.min.js");
const APP = { id: "1", key: "browser-key", secret: "browser-secret" };

let browser;
let herald;

before(async () => {
  browser = await launch();
  const apps = `[{id="${APP.id}",key="${APP.key}",secret="${APP.secret}"}]`;
  herald = await startHerald(await freePort(), { HERALD_PUSHER__APPS: apps });
});

after(async () => {
  await browser?.close();
  await herald?.stop();
});

/** POST /apps/<id>/events, signed as the Pusher server SDKs sign it. */
async function trigger(channel, name, data) {
  const body = JSON.stringify({ name, channel, data });
  const path = `/apps/${APP.id}/events`;
  const query = [
    `auth_key=${APP.key}`,
    `auth_timestamp=${Math.floor(Date.now() / 1000)}`,
    "auth_version=1.0",
    `body_md5=${createHash("md5").update(body).digest("hex")}`,
  ].join("&");
  const signature = createHmac("sha256", APP.secret).update(`POST\n${path}\n${query}`).digest("hex");
  const r = await fetch(`${herald.base}${path}?${query}&auth_signature=${signature}`, {
    method: "POST",
    headers: { "content-type": "application/json" },
    body,
  });
  assert.equal(r.status, 200, await r.text());
}

test("pusher-js in Chromium: Herald API and Pusher API events, presence via a custom authorizer", async () => {
  const context = await browser.newContext();
  const page = await context.newPage();
  await page.goto(`${herald.base}/`);
  await page.addScriptTag({ path: PUSHER_JS });
  // The page's "backend" signs presence subscriptions; the secret is only in the test page.
  const presenceAuth = async (socketId, channel) => {
    const channelData = JSON.stringify({ user_id: "web-1", user_info: { name: "Chromium" } });
    const sig = createHmac("sha256", APP.secret).update(`${socketId}:${channel}:${channelData}`).digest("hex");
    return { auth: `${APP.key}:${sig}`, channel_data: channelData };
  };
  await page.exposeFunction("authorize", presenceAuth);
  await page.evaluate(
    ({ key, port }) => {
      window.got = [];
      window.members = null;
      const pusher = new Pusher(key, {
        cluster: "mt1",
        wsHost: "127.0.0.1",
        wsPort: port,
        forceTLS: false,
        enabledTransports: ["ws"],
        disableStats: true,
        channelAuthorization: {
          customHandler: (params, callback) =>
            window.authorize(params.socketId, params.channelName).then((a) => callback(null, a), (e) => callback(e, null)),
        },
      });
      const news = pusher.subscribe("news");
      news.bind_global((event, data) => {
        if (!event.startsWith("pusher")) window.got.push({ event, data });
      });
      news.bind("pusher:subscription_succeeded", () => (window.newsReady = true));
      const room = pusher.subscribe("presence-web");
      room.bind("pusher:subscription_succeeded", (m) => (window.members = { count: m.count, me: m.me.info.name }));
    },
    { key: APP.key, port: herald.port },
  );
  await until("the news subscription", () => page.evaluate(() => window.newsReady === true));
  await publish(herald.base, "news", { from: "herald api" });
  await trigger("news", "story", JSON.stringify({ from: "pusher api" }));
  const got = await until("two events in the page", async () => {
    const g = await page.evaluate(() => window.got);
    return g.length >= 2 && g;
  });
  assert.deepEqual(got, [
    { event: "message", data: { from: "herald api" } },
    { event: "story", data: { from: "pusher api" } },
  ]);
  const members = await until("the presence member list", () => page.evaluate(() => window.members));
  assert.deepEqual(members, { count: 1, me: "Chromium" });
  await page.screenshot({ path: path.join(shots, "pusher-js.png") });
  await context.close();
});
