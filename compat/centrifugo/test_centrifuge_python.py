"""centrifuge-python, unmodified from PyPI, against a real Herald on /connection/websocket.

Run with the venv made from requirements.txt:  HERALD_BIN=... .venv/bin/python -m unittest -v
"""

import asyncio
import base64
import hashlib
import hmac
import json
import os
import subprocess
import tempfile
import time
import unittest
import urllib.request
from pathlib import Path

import cent
from centrifuge import Client, SubscriptionEventHandler

HERE = Path(__file__).resolve().parent
BIN = os.environ.get("HERALD_BIN") or str(HERE / "../../target/debug/herald")
SECRET = "centrifugo-compat-secret-0123456789-abcdefghij"
API_KEY = "centrifugo-compat-api-key"
CONFIG = f"""
[auth]
leeway = "1s"

[api]
key = "{API_KEY}"

[channels.namespaces.chat]
publish = true
presence = true
join_leave = true
history_size = 1000

[websocket]
ping_interval = "2s"
"""


def token(user: str, ttl: int = 3600) -> str:
    """An HS256 connection token, as a Centrifugo backend mints it."""

    def b64(raw: bytes) -> str:
        return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()

    header = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    payload = b64(json.dumps({"sub": user, "exp": int(time.time()) + ttl, "info": {"name": user}}).encode())
    signature = hmac.new(SECRET.encode(), f"{header}.{payload}".encode(), hashlib.sha256).digest()
    return f"{header}.{payload}.{b64(signature)}"


class Herald:
    """The herald binary on a kernel-picked port, behind a TCP proxy that can drop connections."""

    def __init__(self) -> None:
        self.dir = tempfile.TemporaryDirectory()
        self.config = Path(self.dir.name) / "herald.toml"
        self.config.write_text(CONFIG)
        self.port = 0
        self.writers: set = set()

    async def start(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("HERALD_")}
        env["HERALD_AUTH__SECRET"] = SECRET
        env["RUST_LOG"] = "info"
        self.proc = await asyncio.create_subprocess_exec(
            BIN, "serve", "--config", str(self.config), "--listen", "127.0.0.1:0",
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
        log = b""
        while b"listening" not in log:
            line = await asyncio.wait_for(self.proc.stderr.readline(), 20)
            if not line:
                raise RuntimeError(f"herald exited: {log.decode(errors='replace')}")
            log = line
        text = log.decode()
        self.port = int(text.split("127.0.0.1:")[1].split()[0].strip('"'))
        self.drain = asyncio.ensure_future(self._drain())
        self.proxy = await asyncio.start_server(self._pipe, "127.0.0.1", 0)
        self.proxy_port = self.proxy.sockets[0].getsockname()[1]

    async def _drain(self) -> None:
        while await self.proc.stderr.readline():
            pass

    async def _pipe(self, reader, writer) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.port)
        self.writers.update({writer, up_writer})

        async def copy(src, dst):
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                dst.close()

        await asyncio.gather(copy(reader, up_writer), copy(up_reader, writer))
        self.writers.difference_update({writer, up_writer})

    def drop(self) -> int:
        """Cuts every proxied TCP connection without a WebSocket close."""
        n = len(self.writers)
        for w in list(self.writers):
            w.transport.abort()
        return n

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.proxy_port}/connection/websocket"

    @property
    def cent_url(self) -> str:
        """Centrifugo's server API shape (what `cent` and the other API clients call)."""
        return f"http://127.0.0.1:{self.port}/centrifugo/api"

    def api(self, method: str, body: dict) -> dict:
        req = urllib.request.Request(
            f"http://127.0.0.1:{self.port}/api/{method}",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json", "Authorization": f"apikey {API_KEY}"},
        )
        with urllib.request.urlopen(req, timeout=10) as res:
            return json.load(res)

    async def stop(self) -> None:
        self.drop()
        self.proxy.close()
        self.proc.terminate()
        await self.proc.wait()
        self.drain.cancel()
        self.dir.cleanup()


class Recorder(SubscriptionEventHandler):
    def __init__(self) -> None:
        self.pubs: list = []
        self.subscribed: list = []
        self.joins: list = []
        self.leaves: list = []

    async def on_publication(self, ctx) -> None:
        self.pubs.append(ctx.pub)

    async def on_subscribed(self, ctx) -> None:
        self.subscribed.append(ctx)

    async def on_join(self, ctx) -> None:
        self.joins.append(ctx.info)

    async def on_leave(self, ctx) -> None:
        self.leaves.append(ctx.info)


async def wait_for(cond, what: str, seconds: float = 15) -> None:
    until = time.monotonic() + seconds
    while not cond():
        if time.monotonic() > until:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


class CentrifugePython(unittest.IsolatedAsyncioTestCase):
    async def asyncSetUp(self) -> None:
        self.herald = Herald()
        await self.herald.start()
        self.clients: list = []

    async def asyncTearDown(self) -> None:
        for c in self.clients:
            await c.disconnect()
        await self.herald.stop()

    async def client(self, user: str) -> Client:
        async def get_token() -> str:
            return token(user)

        c = Client(self.herald.url, get_token=get_token, proxy=None, min_reconnect_delay=0.05, max_reconnect_delay=0.5)
        self.clients.append(c)
        await c.connect()
        await c.ready(timeout=10)
        return c

    async def subscribe(self, c: Client, channel: str, **options):
        events = Recorder()
        sub = c.new_subscription(channel, events=events, **options)
        await sub.subscribe()
        await sub.ready(timeout=10)
        return sub, events

    async def test_receives_and_recovers_after_a_dropped_connection(self) -> None:
        c = await self.client("42")
        _, seen = await self.subscribe(c, "news")
        self.assertTrue(seen.subscribed[0].recoverable)
        self.herald.api("publish", {"channel": "news", "data": {"n": 1}})
        await wait_for(lambda: len(seen.pubs) == 1, "the first publication")

        self.assertGreater(self.herald.drop(), 0)
        for n in range(2, 5):
            self.herald.api("publish", {"channel": "news", "data": {"n": n}})
        await wait_for(lambda: len(seen.subscribed) == 2, "subscribed again")
        self.assertTrue(seen.subscribed[1].was_recovering)
        self.assertTrue(seen.subscribed[1].recovered)
        await wait_for(lambda: len(seen.pubs) == 4, "the missed publications")
        self.herald.api("publish", {"channel": "news", "data": {"n": 5}})
        await wait_for(lambda: len(seen.pubs) == 5, "then live")
        self.assertEqual([p.data["n"] for p in seen.pubs], [1, 2, 3, 4, 5])
        offsets = [p.offset for p in seen.pubs]
        self.assertEqual(offsets, list(range(offsets[0], offsets[0] + 5)))

    async def test_presence_history_and_publish(self) -> None:
        ada, bob = await self.client("ada"), await self.client("bob")
        a_sub, a_seen = await self.subscribe(ada, "chat:room", join_leave=True)
        b_sub, _ = await self.subscribe(bob, "chat:room", join_leave=True)
        await wait_for(lambda: any(i.user == "bob" for i in a_seen.joins), "bob's join")
        presence = await a_sub.presence()
        self.assertEqual(sorted(info.user for info in presence.clients.values()), ["ada", "bob"])
        stats = await a_sub.presence_stats()
        self.assertEqual((stats.num_clients, stats.num_users), (2, 2))
        await b_sub.publish({"text": "hi"})
        await wait_for(lambda: len(a_seen.pubs) == 1, "bob's message")
        self.assertEqual(a_seen.pubs[0].data, {"text": "hi"})
        self.assertEqual(a_seen.pubs[0].info.user, "bob")
        history = await a_sub.history(limit=10)
        self.assertEqual([p.data for p in history.publications], [{"text": "hi"}])
        await b_sub.unsubscribe()
        await wait_for(lambda: any(i.user == "bob" for i in a_seen.leaves), "bob's leave")


    async def test_cent_publishes_and_reads_presence_and_history(self) -> None:
        api = cent.Client(self.herald.cent_url, API_KEY)
        ada = await self.client("ada")
        _, seen = await self.subscribe(ada, "chat:room")

        result = await asyncio.to_thread(
            api.publish, cent.PublishRequest(channel="chat:room", data={"text": "from cent"}, tags={"kind": "note"})
        )
        self.assertEqual(result.offset, 1)
        self.assertTrue(result.epoch)
        await wait_for(lambda: len(seen.pubs) == 1, "cent's publication")
        self.assertEqual(seen.pubs[0].data, {"text": "from cent"})
        self.assertEqual(seen.pubs[0].tags, {"kind": "note"})

        presence = await asyncio.to_thread(api.presence, cent.PresenceRequest(channel="chat:room"))
        self.assertEqual([c.user for c in presence.presence.values()], ["ada"])
        self.assertEqual(list(presence.presence.values())[0].conn_info, {"name": "ada"})
        stats = await asyncio.to_thread(api.presence_stats, cent.PresenceStatsRequest(channel="chat:room"))
        self.assertEqual((stats.num_clients, stats.num_users), (1, 1))

        history = await asyncio.to_thread(api.history, cent.HistoryRequest(channel="chat:room", limit=10))
        self.assertEqual([p.data for p in history.publications], [{"text": "from cent"}])
        self.assertEqual(history.publications[0].tags, {"kind": "note"})
        position = await asyncio.to_thread(api.history, cent.HistoryRequest(channel="chat:room"))
        self.assertEqual((position.publications, position.offset), ([], 1), "no limit: the position only")

        with self.assertRaises(cent.CentApiResponseError) as refused:
            await asyncio.to_thread(api.presence, cent.PresenceRequest(channel="news"))
        self.assertEqual(refused.exception.code, 108, "presence is off outside `chat`")
        with self.assertRaises(cent.CentUnauthorizedError):
            await asyncio.to_thread(cent.Client(self.herald.cent_url, "wrong-key").publish,
                                    cent.PublishRequest(channel="news", data=1))


if __name__ == "__main__":
    unittest.main()
