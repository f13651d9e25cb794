// A real Herald with one Pusher app, and the app's backend: a small HTTP server that
// authorizes channels and users with the unmodified `pusher` server SDK, as an app would.

import { spawn } from "node:child_process";
import { mkdtempSync, writeFileSync } from "node:fs";
import { createServer } from "node:http";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import PusherServer from "pusher";

const here = fileURLToPath(new URL(".", import.meta.url));
export const BIN = resolve(here, process.env.HERALD_BIN || "../../target/debug/herald");
export const APP = { id: "1", key: "app-key", secret: "app-secret" };

const CONFIG = `
[[pusher.apps]]
id = "${APP.id}"
key = "${APP.key}"
secret = "${APP.secret}"

[pusher]
activity_timeout = "30s"
`;

export const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/** Polls `cond` until it is true; fails after `ms` with `what`. */
export async function waitFor(cond, what, ms = 10000) {
  const until = Date.now() + ms;
  while (!cond()) {
    if (Date.now() > until) throw new Error(`timed out waiting for ${what}`);
    await sleep(10);
  }
}

export class Herald {
  async start() {
    const dir = mkdtempSync(join(tmpdir(), "herald-pusher-"));
    const config = join(dir, "herald.toml");
    writeFileSync(config, CONFIG);
    const env = Object.fromEntries(Object.entries(process.env).filter(([k]) => !k.startsWith("HERALD_")));
    env.RUST_LOG = "info";
    const proc = (this.proc = spawn(BIN, ["serve", "--config", config, "--listen", "127.0.0.1:0"], {
      env,
      stdio: ["ignore", "ignore", "pipe"],
    }));
    let log = "";
    await new Promise((ok, fail) => {
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
    // The app's server side, as its backend would configure the SDK for a self-hosted server.
    this.sdk = new PusherServer({ ...APP, appId: APP.id, host: "127.0.0.1", port: String(this.port), useTLS: false });
    return this;
  }

  /** Options for pusher-js (and Laravel Echo) pointing at this Herald and `backend`. */
  clientOptions(backend, user) {
    const headers = user ? { "x-user": user } : {};
    return {
      cluster: "mt1",
      wsHost: "127.0.0.1",
      wsPort: this.port,
      forceTLS: false,
      enabledTransports: ["ws"],
      disableStats: true,
      channelAuthorization: { endpoint: `${backend.url}/pusher/auth`, transport: "ajax", headers },
      userAuthentication: { endpoint: `${backend.url}/pusher/user-auth`, transport: "ajax", headers },
    };
  }

  /** POST /api/<method> (Herald's own API; loopback needs no key). */
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

  stop() {
    const proc = this.proc;
    if (!proc || proc.exitCode !== null || proc.signalCode) return Promise.resolve();
    return new Promise((ok) => {
      proc.on("exit", ok);
      proc.kill("SIGTERM");
    });
  }
}

/**
 * The app's backend: `/pusher/auth` signs private and presence subscriptions for the user
 * named by the `x-user` header (none: refused), `/pusher/user-auth` signs that user in.
 * Counts the requests it answered, so tests can tell the auth endpoint was used.
 */
export class Backend {
  constructor(sdk) {
    this.sdk = sdk;
    this.authorized = 0;
  }

  start() {
    this.server = createServer((req, res) => {
      let body = "";
      req.on("data", (c) => (body += c));
      req.on("end", () => {
        const form = new URLSearchParams(body);
        const socketId = form.get("socket_id");
        const user = req.headers["x-user"];
        const send = (status, obj) => {
          res.writeHead(status, { "content-type": "application/json" });
          res.end(JSON.stringify(obj));
        };
        if (!user) return send(403, { error: "no user" });
        this.authorized++;
        if (req.url === "/pusher/auth") {
          const channel = form.get("channel_name");
          const member = channel.startsWith("presence-") ? { user_id: user, user_info: { name: `user ${user}` } } : undefined;
          return send(200, this.sdk.authorizeChannel(socketId, channel, member));
        }
        if (req.url === "/pusher/user-auth") {
          return send(200, this.sdk.authenticateUser(socketId, { id: user, name: `user ${user}` }));
        }
        send(404, {});
      });
    });
    return new Promise((ok) =>
      this.server.listen(0, "127.0.0.1", () => {
        this.url = `http://127.0.0.1:${this.server.address().port}`;
        ok(this);
      }),
    );
  }

  stop() {
    return new Promise((ok) => this.server.close(ok));
  }
}
