"""Liveness, readiness and Prometheus metrics over HTTP on HEALTH_PORT."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from worker import metrics
from worker.watchdog import Watchdog

Check = Callable[[], Awaitable[tuple[bool, str]]]


class HealthServer:
    """``/livez`` answers from a heartbeat the poll loop beats and the watchdog's stalled jobs;
    ``/readyz`` runs the checks."""

    def __init__(self, *, port: int, live_within_s: float, ready_checks: dict[str, Check],
                 check_timeout_s: float = 2.0, clock: Callable[[], float] = time.monotonic,
                 watchdog: Watchdog | None = None) -> None:
        self.port = port
        self.live_within_s = live_within_s
        self.ready_checks = ready_checks
        # Below the kubelet's probe timeout: an unreachable database must answer 503, not hang.
        self.check_timeout_s = check_timeout_s
        self._clock = clock
        self.watchdog = watchdog
        self._last_beat = clock()
        self._runner: web.AppRunner | None = None
        self.bound_port: int | None = None

    def beat(self) -> None:
        self._last_beat = self._clock()

    async def _livez(self, _: web.Request) -> web.Response:
        age_s = self._clock() - self._last_beat
        # A job past its stall deadline fails the probe until it ends: if even cancelling it does not
        # end it, only a restart frees its slot, its message and its database session.
        stalled = self.watchdog.stalled() if self.watchdog is not None else []
        live = age_s <= self.live_within_s and not stalled
        body: dict[str, object] = {"live": live, "last_poll_age_s": round(age_s, 1)}
        if stalled:
            body["stalled_jobs"] = [{"job_id": s.job_id, "no_progress_s": s.no_progress_s} for s in stalled]
        return web.json_response(body, status=200 if live else 503)

    async def _run_check(self, check: Check) -> tuple[bool, str]:
        try:
            return await asyncio.wait_for(check(), timeout=self.check_timeout_s)
        except TimeoutError:
            return False, f"no answer within {self.check_timeout_s:g} s"
        except Exception as exc:
            return False, f"{type(exc).__name__}: {exc}"[:300]

    async def _readyz(self, _: web.Request) -> web.Response:
        names = list(self.ready_checks)
        answers = await asyncio.gather(*(self._run_check(self.ready_checks[n]) for n in names))
        results = {name: "ok" if ok else detail for name, (ok, detail) in zip(names, answers, strict=True)}
        ready = all(ok for ok, _ in answers)
        metrics.READY.set(1 if ready else 0)
        return web.json_response({"ready": ready, "checks": results}, status=200 if ready else 503)

    async def _metrics(self, _: web.Request) -> web.Response:
        resp = web.Response(body=generate_latest())
        resp.headers["Content-Type"] = CONTENT_TYPE_LATEST
        return resp

    async def start(self, host: str = "0.0.0.0") -> int:  # noqa: S104 - probes come from the kubelet
        app = web.Application()
        app.router.add_get("/livez", self._livez)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/metrics", self._metrics)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, self.port)
        await site.start()
        addresses = self._runner.addresses  # the real port when HEALTH_PORT is 0
        self.bound_port = int(addresses[0][1]) if addresses else self.port
        return self.bound_port

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
