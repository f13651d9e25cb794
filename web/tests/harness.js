// Starts a real Herald (the binary from HERALD_BIN, or the workspace's debug build) and a
// headless Chromium for the browser tests. Everything on 127.0.0.1; everything stops by itself.
import { spawn } from "node:child_process";
import { once } from "node:events";
import { mkdirSync } from "node:fs";
import net from "node:net";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { chromium } from "playwright-core";

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "../..");
const target = process.env.CARGO_TARGET_DIR ? path.resolve(root, process.env.CARGO_TARGET_DIR) : path.join(root, "target");
export const bin = process.env.HERALD_BIN || path.join(target, "debug/herald");
export const shots = path.join(target, "browser");
mkdirSync(shots, { recursive: true });

/** A port free on 127.0.0.1 right now. */
export async function freePort() {
  const srv = net.createServer();
  srv.listen(0, "127.0.0.1");
  await once(srv, "listening");
  const { port } = srv.address();
  srv.close();
  await once(srv, "close");
  return port;
}

/** A Herald started with `serve --demo` on `port`; `stop()` ends it (SIGTERM, then SIGKILL). */
export async function startHerald(port, env = {}) {
  // Herald reads every HERALD_* variable as configuration: HERALD_BIN is the test's, not its.
  const { HERALD_BIN: _bin, ...inherited } = process.env;
  const child = spawn(bin, ["serve", "--demo", "--listen", `127.0.0.1:${port}`], {
    stdio: ["ignore", "ignore", "pipe"],
    env: { ...inherited, HERALD_LOG__LEVEL: "warn", HERALD_DRAIN_TIMEOUT: "1s", ...env },
  });
  let stderr = "";
  child.stderr.on("data", (d) => {
    stderr += d;
    if (stderr.length > 20000) stderr = stderr.slice(-10000);
  });
  const base = `http://127.0.0.1:${port}`;
  const deadline = Date.now() + 15000;
  for (;;) {
    if (child.exitCode !== null) throw new Error(`herald exited ${child.exitCode}: ${stderr}`);
    try {
      const r = await fetch(`${base}/health`);
      if (r.ok) break;
    } catch {
      /* not listening yet */
    }
    if (Date.now() > deadline) {
      child.kill("SIGKILL");
      throw new Error(`herald did not answer /health within 15 s: ${stderr}`);
    }
    await new Promise((r) => setTimeout(r, 50));
  }
  return {
    port,
    base,
    ws: `ws://127.0.0.1:${port}`,
    stderr: () => stderr,
    async stop() {
      if (child.exitCode !== null) return;
      child.kill("SIGTERM");
      const timer = setTimeout(() => child.kill("SIGKILL"), 5000);
      await once(child, "exit");
      clearTimeout(timer);
    },
  };
}

/** Publishes through Herald's HTTP API (loopback, no key). */
export async function publish(base, channel, data) {
  const r = await fetch(`${base}/api/publish`, {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: JSON.stringify({ channel, data }),
  });
  const body = await r.json();
  if (!r.ok) throw new Error(`publish ${channel}: HTTP ${r.status} ${JSON.stringify(body)}`);
  return body;
}

/** Debian's Chromium, headless, with nothing that reaches outside this machine. */
export async function launch() {
  return chromium.launch({
    executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
    headless: true,
    args: [
      "--no-sandbox",
      "--disable-gpu",
      "--disable-quic",
      "--no-first-run",
      "--disable-background-networking",
      "--disable-component-update",
      "--disable-sync",
    ],
  });
}

/** Polls `fn` until it returns something truthy, or fails with `what` after `ms`. */
export async function until(what, fn, ms = 10000) {
  const deadline = Date.now() + ms;
  let last;
  for (;;) {
    last = await fn();
    if (last) return last;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what} (last: ${JSON.stringify(last)})`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

/**
 * A TCP proxy on 127.0.0.1 in front of `targetPort` whose link can be cut: `cut()` resets
 * every open connection and refuses new ones (what a dropped Wi-Fi looks like to a
 * WebSocket), `restore()` lets connections through again.
 */
export async function cuttableProxy(targetPort) {
  const open = new Set();
  let down = false;
  const server = net.createServer((client) => {
    if (down) return client.resetAndDestroy();
    const upstream = net.connect(targetPort, "127.0.0.1");
    const pair = { client, upstream };
    open.add(pair);
    const end = () => {
      open.delete(pair);
      client.destroy();
      upstream.destroy();
    };
    client.on("error", end).on("close", end);
    upstream.on("error", end).on("close", end);
    client.pipe(upstream);
    upstream.pipe(client);
  });
  server.listen(0, "127.0.0.1");
  await once(server, "listening");
  const { port } = server.address();
  return {
    port,
    base: `http://127.0.0.1:${port}`,
    cut() {
      down = true;
      for (const { client, upstream } of open) {
        client.resetAndDestroy();
        upstream.destroy();
      }
      open.clear();
    },
    restore() {
      down = false;
    },
    async close() {
      this.cut();
      server.close();
      await once(server, "close");
    },
  };
}
