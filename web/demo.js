// Small helpers shared by the demo pages (no framework): the state pill, URLs, lists.

/** The WebSocket base URL of the server that served this page (ws: or wss:). */
export const wsBase = `${location.protocol === "https:" ? "wss" : "ws"}://${location.host}`;

/** Shows `state` ("connecting" | "connected" | "disconnected" | "closed") in the header pill. */
export function showState(state, detail = "") {
  const pill = document.getElementById("state");
  if (!pill) return;
  pill.dataset.state = state;
  pill.textContent = detail ? `${state} · ${detail}` : state;
}

/** Wires an SDK client's events to the state pill, and errors that need the user to the notice. */
export function trackState(herald) {
  herald.on("error", (err) => {
    // 5: no token (getToken failed); 100+: the server refused. Transient network errors only
    // show in the pill: the SDK reconnects by itself.
    const notice = document.getElementById("notice");
    if (!notice || !err || !(err.code === 5 || err.code >= 100)) return;
    notice.hidden = false;
    notice.textContent = `${err.message || err} (is Herald running with --demo?)`;
  });
  herald.on("connecting", () => showState("connecting"));
  herald.on("connected", () => showState("connected"));
  herald.on("disconnected", (ctx) =>
    showState(ctx && ctx.reconnect === false ? "closed" : "disconnected", ctx && ctx.code ? `${ctx.code}` : ""),
  );
}

/** Creates an element with text (never HTML: what a peer sent is untrusted). */
export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v;
    else if (k === "dataset") Object.assign(node.dataset, v);
    else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return node;
}

/** Appends `item` to `list`, drops the oldest beyond `max`, keeps the view at the bottom. */
export function append(list, item, max = 500) {
  const atBottom = list.scrollTop + list.clientHeight >= list.scrollHeight - 8;
  list.append(item);
  while (list.children.length > max) list.firstElementChild.remove();
  if (atBottom) list.scrollTop = list.scrollHeight;
}

/** A development connection token for `user`, from `/demo/token` (only under `--demo`). */
export async function demoToken(user) {
  const res = await fetch(`/demo/token?user=${encodeURIComponent(user)}`);
  const body = await res.json().catch(() => ({}));
  if (!res.ok) throw new Error(body.error ? body.error.message : `HTTP ${res.status}`);
  return body.token;
}

/** Publishes through the HTTP API, as a backend would (Herald answers loopback without a key). */
export async function apiPublish(channel, data) {
  const res = await fetch("/api/publish", {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ channel, data }),
  });
  const body = await res.json().catch(() => ({}));
  if (!res.ok) throw new Error(body.error ? `${body.error.message} (${body.error.code})` : `HTTP ${res.status}`);
  return body;
}

export function timeOf(ms = Date.now()) {
  return new Date(ms).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", second: "2-digit" });
}
