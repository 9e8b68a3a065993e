"""A real HTTP proxy in front of moto's SQS server that forwards every call and fails the ones a test picks.

botocore's SQS speaks the JSON protocol (``X-Amz-Target: AmazonSQS.SendMessage``); the query protocol's
``Action=SendMessage`` form field is recognised too. A fault is injected per operation:

- ``"500"``: answered with an InternalError, never forwarded (the call did not happen);
- ``"drop"``: the connection is closed without an answer, never forwarded;
- ``"drop_after"``: forwarded (the call happened in SQS), then the connection is closed: the client
  cannot tell it succeeded;
- ``"stall"``: held until :meth:`FaultyProxy.release` (then forwarded), to catch a caller mid-call.

Usage::

    async with FaultyProxy(moto_url) as proxy:
        proxy.fail("SendMessage", times=2)           # the next two sends fail
        proxy.fail("DeleteMessage", mode="drop")     # every delete fails until proxy.heal()
"""

from __future__ import annotations

import asyncio
from collections import Counter
from dataclasses import dataclass
from typing import Any, Literal

import aiohttp
from aiohttp import web

Mode = Literal["500", "drop", "drop_after", "stall"]
_HOP_BY_HOP = {"host", "content-length", "transfer-encoding", "connection", "content-encoding", "keep-alive"}


@dataclass
class _Fault:
    mode: Mode
    times: int | None  # None: until healed


class FaultyProxy:
    """Forwards to ``upstream``; ``calls`` counts every call seen, ``failed`` the ones made to fail."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream.rstrip("/")
        self.calls: Counter[str] = Counter()
        self.failed: Counter[str] = Counter()
        self.stalled = asyncio.Event()  # set when a stalled call has arrived
        self._release = asyncio.Event()
        self._faults: dict[str, list[_Fault]] = {}
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None
        self.url = ""

    def fail(self, operation: str, *, times: int | None = None, mode: Mode = "500") -> None:
        """Fail the next ``times`` calls of ``operation`` (every call while ``times`` is None); faults
        added for one operation apply one after the other."""
        self._faults.setdefault(operation, []).append(_Fault(mode, times))

    def heal(self, operation: str | None = None) -> None:
        if operation is None:
            self._faults.clear()
        else:
            self._faults.pop(operation, None)

    def release(self) -> None:
        """Let stalled calls through (and every later one of a stalled operation)."""
        self._release.set()

    async def __aenter__(self) -> FaultyProxy:
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None))
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self._release.set()
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()

    def _take_fault(self, operation: str) -> _Fault | None:
        faults = self._faults.get(operation)
        if not faults:
            return None
        fault = faults[0]
        if fault.times is not None:
            fault.times -= 1
            if fault.times <= 0:
                faults.pop(0)
        self.failed[operation] += 1
        return fault

    @staticmethod
    async def _operation(request: web.Request, body: bytes) -> str:
        target = request.headers.get("X-Amz-Target", "")
        if target:
            return target.rsplit(".", 1)[-1]
        if request.content_type == "application/x-www-form-urlencoded":
            form = dict(p.split("=", 1) for p in body.decode().split("&") if "=" in p)
            return form.get("Action", "")
        return request.query.get("Action", "")

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        operation = await self._operation(request, body)
        self.calls[operation] += 1
        fault = self._take_fault(operation)
        if fault is not None and fault.mode == "500":
            return web.json_response({"__type": "com.amazonaws.sqs#InternalError", "message": "injected fault"},
                                     status=500, headers={"x-amzn-query-error": "InternalError;Receiver"},
                                     content_type="application/x-amz-json-1.0")
        if fault is not None and fault.mode == "drop":
            return self._drop(request)
        if fault is not None and fault.mode == "stall":
            self.stalled.set()
            await self._release.wait()
        status, headers, payload = await self._forward(request, body)
        if fault is not None and fault.mode == "drop_after":
            return self._drop(request)
        return web.Response(status=status, headers=headers, body=payload)

    @staticmethod
    def _drop(request: web.Request) -> web.StreamResponse:
        if request.transport is not None:
            request.transport.abort()
        return web.Response(status=500)  # never delivered: the connection is gone

    async def _forward(self, request: web.Request, body: bytes) -> tuple[int, dict[str, Any], bytes]:
        assert self._session is not None
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP_BY_HOP}
        async with self._session.request(request.method, self.upstream + request.path_qs, headers=headers,
                                         data=body) as resp:
            payload = await resp.read()
            out = {k: v for k, v in resp.headers.items() if k.lower() not in _HOP_BY_HOP}
            return resp.status, out, payload
