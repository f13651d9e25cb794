// Starts a real Herald for the tests: the binary from HERALD_BIN (default: the workspace's
// debug build), on 127.0.0.1 with a port the kernel picks, and a config file made here.

import { spawn } from "node:child_process";
import { createHmac } from "node:crypto";
import { mkdtempSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import { fileURLToPath } from "node:url";

const here = fileURLToPath(new URL(".", import.meta.url));
export const BIN = resolve(here, "..", process.env.HERALD_BIN || "../../target/debug/herald");
export const SECRET = "js-sdk-tests-secret-0123456789-abcdefghij";

// chat: clients may publish, with presence and join/leave; ticks: conflated, at most 20 per
// second per subscriber; token: subscribing takes a subscription token. Pings every second so that liveness acts within a test's time, and a
// leeway of one second so that expired tokens do too.
const CONFIG = `
[auth]
leeway = "1s"

[channels.namespaces.chat]
publish = true
presence = true
join_leave = true
history_size = 1000

[channels.namespaces.ticks]
conflation = "latest"
max_rate = 20
history_size = 1000

[channels.namespaces.token]
subscribe = "token"
history_size = 1000

[websocket]
ping_interval = "1s"
`;

/**
 * An HS256 token for `user`, valid `ttl` seconds; `claims` adds e.g. `channel` (a subscription
 * token) or `channels` (server-side subscriptions).
 */
export function token(user, ttl = 3600, info, claims) {
  const b64 = (o) => Buffer.from(JSON.stringify(o)).toString("base64url");
  const payload = { sub: user, exp: Math.floor(Date.now() / 1000) + ttl, info, ...claims };
  const body = `${b64({ alg: "HS256", typ: "JWT" })}.${b64(payload)}`;
  return `${body}.${createHmac("sha256", SECRET).update(body).digest("base64url")}`;
}

export const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/** Polls `cond` until it is true; fails after `ms` with `what`. */
export async function waitFor(cond, what, ms = 10000) {
  const until = Date.now() + ms;
  while (!cond()) {
    if (Date.now() > until) throw new Error(`timed out waiting for ${what}`);
    await sleep(10);
  }
}

export class Server {
  constructor() {
    this.dir = mkdtempSync(join(tmpdir(), "herald-js-"));
    this.config = join(this.dir, "herald.toml");
    writeFileSync(this.config, CONFIG);
    this.port = 0;
  }

  get url() {
    return `ws://127.0.0.1:${this.port}/connect`;
  }

  /** Starts the binary and resolves once it logs the address it listens on. */
  start() {
    const env = Object.fromEntries(Object.entries(process.env).filter(([k]) => !k.startsWith("HERALD_")));
    env.HERALD_AUTH__SECRET = SECRET;
    env.RUST_LOG = "info";
    const args = ["serve", "--config", this.config, "--listen", `127.0.0.1:${this.port}`];
    const proc = (this.proc = spawn(BIN, args, { env, stdio: ["ignore", "ignore", "pipe"] }));
    let log = "";
    return new Promise((ok, fail) => {
      const timer = setTimeout(() => fail(new Error(`herald did not start:\n${log}`)), 20000);
      proc.on("error", (e) => fail(new Error(`cannot run ${BIN} (cargo build -p herald-cli): ${e.message}`)));
      proc.stderr.on("data", (chunk) => {
        log = (log + chunk).slice(-4000);
        const m = /listening.*?addr[=":]+127\.0\.0\.1:(\d+)/.exec(log);
        if (m && !this.port) this.port = Number(m[1]);
        if (m) {
          clearTimeout(timer);
          ok(this);
        }
      });
      proc.on("exit", (code) => fail(new Error(`herald exited with ${code}:\n${log}`)));
    });
  }

  /** Stops the server (SIGTERM: clients get 1001) and waits for the process to end. */
  stop() {
    const proc = this.proc;
    if (!proc || proc.exitCode !== null || proc.signalCode) return Promise.resolve();
    return new Promise((ok) => {
      proc.on("exit", ok);
      proc.kill("SIGTERM");
    });
  }

  /** POST /api/<method>; resolves to the parsed answer, rejects on an HTTP error. */
  async api(method, body) {
    const res = await fetch(`http://127.0.0.1:${this.port}/api/${method}`, {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify(body),
    });
    const answer = await res.json();
    if (!res.ok) throw new Error(`${method}: HTTP ${res.status} ${JSON.stringify(answer)}`);
    return answer;
  }
}
