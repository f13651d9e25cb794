// The demo pages and the SDK in headless Chromium against a real Herald (`serve --demo`).
// Screenshots of every demo page land in target/browser/.
import assert from "node:assert/strict";
import http from "node:http";
import { once } from "node:events";
import path from "node:path";
import { after, before, describe, test } from "node:test";
import { cuttableProxy, freePort, launch, publish, shots, startHerald, until } from "./harness.js";

let browser;
let herald;

before(async () => {
  browser = await launch();
  herald = await startHerald(await freePort());
});

after(async () => {
  await browser?.close();
  await herald?.stop();
});

async function newPage(url) {
  const context = await browser.newContext({ viewport: { width: 1100, height: 760 } });
  const page = await context.newPage();
  const errors = [];
  page.on("pageerror", (e) => errors.push(e.message));
  page.errors = errors;
  await page.goto(url);
  return page;
}

const state = (page) => page.evaluate(() => document.getElementById("state").dataset.state);
const connected = (page, ms) => until("the page to be connected", async () => (await state(page)) === "connected", ms);
// After an outage: the SDK retries with full-jitter backoff doubling from 250 ms, so a few
// seconds offline can put its next attempt up to 8-16 s away (backoffMax is 20 s).
const AFTER_OUTAGE_MS = 25000;
const texts = (page, selector) => page.$$eval(selector, (els) => els.map((e) => e.textContent));
const shot = (page, name) => page.screenshot({ path: path.join(shots, `${name}.png`), fullPage: true });

describe("demo pages", () => {
  test("two pages chat: names, who is here, messages both ways, history on open", async () => {
    const ada = await newPage(`${herald.base}/demo/chat?room=lobby&name=ada`);
    await connected(ada);
    const bob = await newPage(`${herald.base}/demo/chat?room=lobby&name=bob`);
    await connected(bob);
    await until("ada to see bob arrive", async () => (await texts(ada, "#people li")).includes("bob"));
    await until("bob to see ada", async () => (await texts(bob, "#people li")).includes("ada"));

    await ada.fill("#text", "hello bob");
    await ada.press("#text", "Enter");
    await until("bob to receive ada's message", async () => (await texts(bob, "#messages li[data-offset]")).includes("adahello bob"));
    await bob.fill("#text", "hi ada, how is the push?");
    await bob.click("#send-button");
    await until("ada to receive bob's reply", async () =>
      (await texts(ada, "#messages li[data-offset]")).includes("bobhi ada, how is the push?"));
    await ada.fill("#text", "instant. open a third tab!");
    await ada.press("#text", "Enter");

    // A third visitor gets the history when the page opens.
    const cy = await newPage(`${herald.base}/demo/chat?room=lobby&name=cy`);
    await connected(cy);
    await until("the history to load", async () => (await texts(cy, "#messages li[data-offset]")).length === 3);
    assert.deepEqual(await texts(cy, "#messages li[data-offset]"), [
      "adahello bob",
      "bobhi ada, how is the push?",
      "adainstant. open a third tab!",
    ]);
    await until("ada to see cy join", async () => (await texts(ada, "#messages li.event")).includes("cy joined"));
    await cy.context().close();
    await until("ada to see cy leave", async () => (await texts(ada, "#messages li.event")).includes("cy left"));
    await shot(ada, "chat");
    assert.deepEqual([...ada.errors, ...bob.errors], []);
    await ada.context().close();
    await bob.context().close();
  });

  test("offline while 50 messages are published: each shown exactly once, in order", async () => {
    // The page reaches Herald through a proxy whose link the test cuts, and Chromium is put
    // offline (DevTools network emulation), so reconnecting fails until the network is back.
    const proxy = await cuttableProxy(herald.port);
    const page = await newPage(`${proxy.base}/demo/chat?room=offline&name=dora`);
    try {
      await connected(page);
      await publish(herald.base, "chat:offline", { name: "bot", text: "before" });
      await until("the first message", async () => (await texts(page, "#messages li[data-offset]")).length === 1);

      await page.context().setOffline(true);
      proxy.cut();
      await until("the page to notice", async () => (await state(page)) !== "connected");
      for (let i = 1; i <= 50; i++) await publish(herald.base, "chat:offline", { name: "bot", text: `m${i}` });
      await page.waitForTimeout(500);
      assert.equal((await texts(page, "#messages li[data-offset]")).length, 1, "nothing arrives while offline");

      proxy.restore();
      await page.context().setOffline(false);
      await connected(page, AFTER_OUTAGE_MS);
      await until("the 50 missed messages", async () => (await texts(page, "#messages li[data-offset]")).length >= 51, 20000);
      await page.waitForTimeout(300); // anything extra (a duplicate) would show up now
      const shown = await texts(page, "#messages li[data-offset]");
      assert.deepEqual(shown, ["botbefore", ...Array.from({ length: 50 }, (_, i) => `botm${i + 1}`)]);
      const offsets = await page.$$eval("#messages li[data-offset]", (els) => els.map((e) => Number(e.dataset.offset)));
      assert.deepEqual(offsets, Array.from({ length: 51 }, (_, i) => i + 1));
      assert.ok((await texts(page, "#messages li.event")).includes("reconnected: missed messages recovered"));
      assert.equal(await page.locator("#notice").isHidden(), true, "no reset notice: the history covered the gap");
      assert.deepEqual(page.errors, []);
    } finally {
      await page.context().close();
      await proxy.close();
    }
  });

  test("notifications: the form publishes through the API to notifications#<user>", async () => {
    const page = await newPage(`${herald.base}/demo/notifications?user=alice`);
    await connected(page);
    await page.fill("#title", "Your order has shipped");
    await page.click("button[type=submit]");
    await page.fill("#title", "Ada mentioned you in #lobby");
    await page.fill("#body", "\u201cThe ticker page is lovely, have a look.\u201d");
    await page.click("button[type=submit]");
    await until("two notifications", async () => (await page.$$("#inbox .toast")).length === 2);
    assert.deepEqual(await texts(page, "#inbox .toast .title"), ["Ada mentioned you in #lobby", "Your order has shipped"]);
    // Another user's page does not see alice's notifications (the channel's user list).
    const other = await newPage(`${herald.base}/demo/notifications?user=bob`);
    await connected(other);
    await publish(herald.base, "notifications#alice", { title: "only for alice" });
    await until("alice's third", async () => (await page.$$("#inbox .toast")).length === 3);
    await other.waitForTimeout(300);
    assert.equal((await other.$$("#inbox .toast")).length, 0);
    await shot(page, "notifications");
    assert.deepEqual(page.errors, []);
    await page.context().close();
    await other.context().close();
  });

  test("ticker: prices from the demo publisher update several times a second", async () => {
    const page = await newPage(`${herald.base}/demo/ticker`);
    await connected(page);
    await until("five symbols", async () => (await page.$$("#rows tr")).length === 5 && (await page.$$("#rows td.sym")).length === 5);
    const first = Number(await page.textContent("#updates"));
    await page.waitForTimeout(2000);
    const later = Number(await page.textContent("#updates"));
    assert.ok(later - first >= 4, `at least 2 updates a second (got ${later - first} in 2 s)`);
    await shot(page, "ticker");
    assert.deepEqual(page.errors, []);
    await page.context().close();
  });

  test("ticker: a network outage of a few seconds is recovered with no gap", async () => {
    const proxy = await cuttableProxy(herald.port);
    const page = await newPage(`${proxy.base}/demo/ticker`);
    try {
      await connected(page);
      await until("some updates", async () => Number(await page.textContent("#updates")) >= 3);
      await page.context().setOffline(true);
      proxy.cut();
      await until("the page to notice", async () => (await state(page)) !== "connected");
      const before = Number(await page.textContent("#offset"));
      await page.waitForTimeout(2000); // about 8 updates published meanwhile
      proxy.restore();
      await page.context().setOffline(false);
      await connected(page, AFTER_OUTAGE_MS);
      await until("the recovery", async () => (await page.textContent("#recovered")) === "1");
      await until("updates past the outage", async () => Number(await page.textContent("#offset")) >= before + 10);
      assert.equal(await page.textContent("#gaps"), "0", "every offset once, in order");
      assert.equal(await page.locator("#notice").isHidden(), true);
      assert.deepEqual(page.errors, []);
    } finally {
      await page.context().close();
      await proxy.close();
    }
  });

  test("plain page: the README snippet and an EventSource both receive; the wrong URL gets 4504", async () => {
    const page = await newPage(`${herald.base}/demo/plain`);
    await until("both connected", async () => (await state(page)) === "connected");
    await page.fill("#message", "hello from the API");
    await page.click("#publish button[type=submit]");
    await until("the WebSocket to receive", async () => (await texts(page, "#ws-log li")).some((t) => t.includes("hello from the API")));
    await until("the EventSource to receive", async () => (await texts(page, "#sse-log li")).some((t) => t.includes("hello from the API")));
    await page.click("#wrong");
    await until("the wrong URL's close", async () => (await texts(page, "#ws-log li")).some((t) => t.includes("closed 4504")));
    await shot(page, "plain");

    // The snippet every tutorial starts with, exactly.
    const closed = await page.evaluate(
      (port) =>
        new Promise((resolve) => {
          const ws = new WebSocket(`ws://localhost:${port}`);
          ws.onclose = (e) => resolve({ code: e.code, reason: e.reason, wasClean: e.wasClean });
        }),
      herald.port,
    );
    assert.equal(closed.code, 4504);
    assert.equal(closed.wasClean, true);
    assert.match(closed.reason, /not a WebSocket endpoint: use \/ws\/<channel> .* \/connect/);
    assert.deepEqual(page.errors, []);
    await page.context().close();
  });

  test("index: links to every demo", async () => {
    const page = await newPage(`${herald.base}/`);
    const links = await page.$$eval("main a.demo-card", (els) => els.map((e) => e.getAttribute("href")));
    assert.deepEqual(links, ["/demo/chat", "/demo/notifications", "/demo/ticker", "/demo/plain"]);
    await shot(page, "index");
    await page.context().close();
  });

  test("SSE from another origin", async (t) => {
    // Needs CORS on /sse/* (Access-Control-Allow-Origin for any origin by default), which
    // another branch adds: skipped, saying so, on a server that does not answer it yet.
    const probe = await fetch(`${herald.base}/sse/news`, { headers: { Origin: "http://example.test" } });
    const allowed = probe.headers.get("access-control-allow-origin");
    await probe.body?.cancel();
    if (!allowed) {
      t.skip("this Herald sends no Access-Control-Allow-Origin on /sse/* (the CORS work is on another branch)");
      return;
    }
    const other = http.createServer((req, res) => {
      res.writeHead(200, { "content-type": "text/html" });
      res.end("<!doctype html><title>other origin</title><ul id=got></ul>");
    });
    other.listen(0, "127.0.0.1");
    await once(other, "listening");
    const page = await newPage(`http://127.0.0.1:${other.address().port}/`);
    try {
      await page.evaluate((url) => {
        const es = new EventSource(url);
        window.sseOpen = false;
        es.onopen = () => (window.sseOpen = true);
        es.onmessage = (e) => document.getElementById("got").append(Object.assign(document.createElement("li"), { textContent: e.data }));
      }, `${herald.base}/sse/crossorigin`);
      await until("the cross-origin EventSource to open", () => page.evaluate(() => window.sseOpen));
      await publish(herald.base, "crossorigin", { n: 1 });
      await until("the event", async () => (await texts(page, "#got li")).includes('{"n":1}'));
    } finally {
      await page.context().close();
      other.close();
    }
  });
});

describe("server restart", () => {
  test("the page reconnects and reports that history could not be recovered", async () => {
    // A configured secret, as in production: tokens minted before the restart stay valid.
    const env = { HERALD_AUTH__SECRET: "a-development-secret-of-at-least-32-bytes-for-the-test" };
    const port = await freePort();
    let server = await startHerald(port, env);
    const page = await newPage(`${server.base}/demo/chat?room=restart&name=eve`);
    try {
      await connected(page);
      await publish(server.base, "chat:restart", { name: "bot", text: "from the first run" });
      await until("the message", async () => (await texts(page, "#messages li[data-offset]")).length === 1);
      await server.stop();
      await until("the page to notice", async () => (await state(page)) !== "connected");
      server = await startHerald(port, env);
      await connected(page);
      await until("the reset notice", () => page.locator("#notice").isVisible());
      assert.match(await page.textContent("#notice"), /could not be recovered/);
      assert.ok((await texts(page, "#messages li.notice")).includes("history could not be recovered"));
      await publish(server.base, "chat:restart", { name: "bot", text: "from the second run" });
      await until("the new run's message", async () =>
        (await texts(page, "#messages li[data-offset]")).includes("botfrom the second run"));
      await shot(page, "chat-after-restart");
      assert.deepEqual(page.errors, []);
    } finally {
      await page.context().close();
      await server.stop();
    }
  });
});
