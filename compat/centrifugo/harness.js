// A real Herald for the compatibility tests: the binary from HERALD_BIN (default: the
// workspace's debug build) on 127.0.0.1 with a port the kernel picks, and a TCP proxy in front
// of it that can drop every connection at once (a network failure, as the SDK sees it).

import { spawn } from "node:child_process";
import { createHmac } from "node:crypto";
import { mkdtempSync, writeFileSync } from "node:fs";
import net from "node:net";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import { fileURLToPath } from "node:url";

const here = fileURLToPath(new URL(".", import.meta.url));
export const BIN = resolve(here, process.env.HERALD_BIN || "../../target/debug/herald");
export const SECRET = "centrifugo-compat-secret-0123456789-abcdefghij";
export const API_KEY = "centrifugo-compat-api-key";

// What a Centrifugo user migrating would configure: a `chat` namespace with presence and
// join/leave where clients may publish, history everywhere (Herald's default).
const CONFIG = `
[auth]
leeway = "1s"

[api]
key = "${API_KEY}"

[channels.namespaces.chat]
publish = true
presence = true
join_leave = true
history_size = 1000

[channels.namespaces.private]
subscribe = "token"

[websocket]
ping_interval = "2s"
`;

/** An HS256 connection token for `user`, valid `ttl` seconds (what a Centrifugo backend mints). */
export function token(user, ttl = 3600, info, claims) {
  const b64 = (o) => Buffer.from(JSON.stringify(o)).toString("base64url");
  const payload = { sub: user, exp: Math.floor(Date.now() / 1000) + ttl, info, ...claims };
  const body = `${b64({ alg: "HS256", typ: "JWT" })}.${b64(payload)}`;
  return `${body}.${createHmac("sha256", SECRET).update(body).digest("base64url")}`;
}

export const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/** Polls `cond` until it is true; fails after `ms` with `what`. */
export async function waitFor(cond, what, ms = 15000) {
  const until = Date.now() + ms;
  while (!cond()) {
    if (Date.now() > until) throw new Error(`timed out waiting for ${what}`);
    await sleep(10);
  }
}

export class Herald {
  constructor() {
    this.dir = mkdtempSync(join(tmpdir(), "herald-centrifugo-"));
    this.config = join(this.dir, "herald.toml");
    writeFileSync(this.config, CONFIG);
    this.port = 0;
    this.sockets = new Set();
  }

  /** Centrifugo's WebSocket endpoint, through the proxy. */
  get url() {
    return `ws://127.0.0.1:${this.proxyPort}/connection/websocket`;
  }

  async start() {
    await this.#spawn();
    this.proxy = net.createServer((client) => {
      const upstream = net.connect(this.port, "127.0.0.1");
      const pair = [client, upstream];
      for (const s of pair) {
        this.sockets.add(s);
        s.on("close", () => this.sockets.delete(s));
        s.on("error", () => {});
      }
      client.pipe(upstream);
      upstream.pipe(client);
      client.on("close", () => upstream.destroy());
      upstream.on("close", () => client.destroy());
    });
    await new Promise((ok) => this.proxy.listen(0, "127.0.0.1", ok));
    this.proxyPort = this.proxy.address().port;
    return this;
  }

  /** Cuts every proxied TCP connection without a WebSocket close: a dropped network. */
  drop() {
    const n = this.sockets.size;
    for (const s of this.sockets) s.destroy();
    return n;
  }

  #spawn() {
    const env = Object.fromEntries(Object.entries(process.env).filter(([k]) => !k.startsWith("HERALD_")));
    env.HERALD_AUTH__SECRET = SECRET;
    env.RUST_LOG = "info";
    const args = ["serve", "--config", this.config, "--listen", "127.0.0.1:0"];
    const proc = (this.proc = spawn(BIN, args, { env, stdio: ["ignore", "ignore", "pipe"] }));
    let log = "";
    return new Promise((ok, fail) => {
      const timer = setTimeout(() => fail(new Error(`herald did not start:\n${log}`)), 20000);
      proc.on("error", (e) => fail(new Error(`cannot run ${BIN} (cargo build -p herald-cli): ${e.message}`)));
      proc.stderr.on("data", (chunk) => {
        log = (log + chunk).slice(-4000);
        const m = /listening.*?addr[=":]+127\.0\.0\.1:(\d+)/.exec(log);
        if (m && !this.port) {
          this.port = Number(m[1]);
          clearTimeout(timer);
          ok();
        }
      });
      proc.on("exit", (code) => fail(new Error(`herald exited with ${code}:\n${log}`)));
    });
  }

  async stop() {
    this.drop();
    await new Promise((ok) => (this.proxy ? this.proxy.close(ok) : ok()));
    const proc = this.proc;
    if (!proc || proc.exitCode !== null || proc.signalCode) return;
    await new Promise((ok) => {
      proc.on("exit", ok);
      proc.kill("SIGTERM");
    });
  }

  /** Herald's own API: POST /api/<method> with the API key. */
  async api(method, body) {
    const res = await fetch(`http://127.0.0.1:${this.port}/api/${method}`, {
      method: "POST",
      headers: { "content-type": "application/json", authorization: `apikey ${API_KEY}` },
      body: JSON.stringify(body),
    });
    const answer = await res.json();
    if (!res.ok) throw new Error(`${method}: HTTP ${res.status} ${JSON.stringify(answer)}`);
    return answer;
  }
}
