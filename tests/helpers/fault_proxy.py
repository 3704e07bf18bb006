"""A fault-injecting HTTP proxy in front of a real OpenAI-compatible server, for the remote
judge's tests and bench. It stands in for what a hosted API does under load: at set
rates it adds latency, answers 429 with Retry-After, answers 500, or drops the
connection without an answer (before forwarding: the upstream never sees that request).
Everything else is forwarded as it came, Authorization header included.

Every request is logged (time, path, what was done to it, the body's hash, whether it
carried the expected bearer key), so a test can count retries, measure requests per
minute and check where the key went. It binds 127.0.0.1 only and runs its own event
loop in a thread."""

from __future__ import annotations

import asyncio
import hashlib
import random
import threading
import time
from dataclasses import dataclass, field

from aiohttp import ClientSession, ClientTimeout, web

from tests.helpers.proc import free_port


@dataclass
class Faults:
    latency_s: float = 0.0
    p429: float = 0.0
    p500: float = 0.0
    pdrop: float = 0.0
    retry_after: str = "0.05"
    fail_all: int = 0  # 0, or a status every request gets (a dead endpoint)


@dataclass
class Logged:
    t: float
    path: str
    fault: str  # "ok", "429", "500", "drop", "fail_all"
    body_sha: str
    authorization: str = field(repr=False, default="")


class FaultProxy:
    def __init__(self, upstream: str, faults: Faults | None = None, seed: int = 0, upstream_key: str | None = None):
        """`upstream_key`: send this bearer key upstream instead of the client's (a gateway holding the key)."""
        self.upstream = upstream.rstrip("/")
        self.upstream_key = upstream_key
        self.faults = faults or Faults()
        self.rng = random.Random(seed)
        self.log: list[Logged] = []
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self._thread.start()
        assert self._ready.wait(30), "fault proxy did not start"
        return self

    def __exit__(self, *exc):
        asyncio.run_coroutine_threadsafe(self._stop(), self._loop).result(30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    async def _stop(self):
        await self._runner.cleanup()  # closes the open keep-alive connections too
        await self._session.close()

    def _run(self):
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._start())
        self._ready.set()
        self._loop.run_forever()

    async def _start(self):
        self._session = ClientSession(timeout=ClientTimeout(total=300))
        server = web.Application(client_max_size=4 << 20)
        server.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(server, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    def _choose(self) -> str:
        f = self.faults
        if f.fail_all:
            return "fail_all"
        x = self.rng.random()
        for name, p in (("429", f.p429), ("500", f.p500), ("drop", f.pdrop)):
            if x < p:
                return name
            x -= p
        return "ok"

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        fault = self._choose()
        self.log.append(Logged(time.time(), request.path, fault, hashlib.sha256(body).hexdigest(),
                               request.headers.get("Authorization", "")))
        if self.faults.latency_s:
            await asyncio.sleep(self.faults.latency_s)
        if fault == "fail_all":
            return web.json_response({"error": {"message": "injected outage"}}, status=self.faults.fail_all)
        if fault == "429":
            return web.json_response({"error": {"message": "injected rate limit"}}, status=429,
                                     headers={"Retry-After": self.faults.retry_after})
        if fault == "500":
            return web.json_response({"error": {"message": "injected server error"}}, status=500)
        if fault == "drop":
            request.transport.close()  # no status line: the client sees the connection end
            raise web.HTTPException()  # aiohttp gives up on a closed transport without writing
        headers = {k: v for k, v in request.headers.items() if k.lower() in ("content-type", "authorization")}
        if self.upstream_key:
            headers = {"Content-Type": request.headers.get("Content-Type", "application/json"),
                       "Authorization": f"Bearer {self.upstream_key}"}
        async with self._session.request(request.method, self.upstream + request.path_qs, data=body,
                                         headers=headers) as r:
            payload = await r.read()
            return web.Response(body=payload, status=r.status, content_type=r.content_type)

    # ------------------------------------------------------------ what the tests read

    def count(self, fault: str | None = None, path_suffix: str = "") -> int:
        return sum((fault is None or e.fault == fault) and e.path.endswith(path_suffix) for e in self.log)

    def per_minute(self, path_suffix: str = "") -> float:
        """Requests per minute over the logged span (first to last request)."""
        ts = [e.t for e in self.log if e.path.endswith(path_suffix)]
        if len(ts) < 2:
            return 0.0
        return (len(ts) - 1) / (ts[-1] - ts[0]) * 60.0

    def max_in_window(self, window_s: float, path_suffix: str = "") -> int:
        """The most requests that started in any window of `window_s` seconds."""
        ts = sorted(e.t for e in self.log if e.path.endswith(path_suffix))
        best, lo = 0, 0
        for hi, t in enumerate(ts):
            while t - ts[lo] >= window_s:
                lo += 1
            best = max(best, hi - lo + 1)
        return best
