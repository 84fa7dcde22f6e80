"""A minimal Chrome DevTools Protocol client for tests: headless chromium driven over aiohttp.

``Browser.launch()`` starts Debian's ``chromium`` headless in its own process group with a fresh
profile directory and reads the ``DevTools listening on ws://...`` line from its stderr; one
WebSocket to that endpoint carries every command (pages are attached in "flat" mode, their
commands carry the page's ``sessionId``).  ``Browser.close()`` asks the browser to quit, then
kills whatever is left of its process group (renderer, GPU and zygote children included) and
removes the profile.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import os
import re
import shutil
import signal
import tempfile
import time
from collections.abc import Mapping
from typing import Any

import aiohttp

LAUNCH_TIMEOUT_S = 30.0
COMMAND_TIMEOUT_S = 15.0
_ENDPOINT = re.compile(r"DevTools listening on (ws://\S+)")


class CdpError(RuntimeError):
    """The browser answered a command with an error, or could not be started."""


def chromium_path() -> str | None:
    """The chromium binary (Debian's package installs /usr/bin/chromium), or None."""
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    return None


class Browser:
    def __init__(self, proc: asyncio.subprocess.Process, profile: str, ws: aiohttp.ClientWebSocketResponse,
                 session: aiohttp.ClientSession, stderr_tail: list[str]) -> None:
        self.proc = proc
        self.profile = profile
        self._ws = ws
        self._http = session
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._stderr_tail = stderr_tail
        self._reader = asyncio.create_task(self._read())
        self._stderr_task: asyncio.Task[None] | None = None

    @classmethod
    async def launch(cls, path: str | None = None, *, width: int = 1280, height: int = 800) -> Browser:
        exe = path or chromium_path()
        if exe is None:
            raise CdpError("chromium is not installed")
        profile = tempfile.mkdtemp(prefix="vmd-chromium-")
        args = [
            "--headless=new", "--remote-debugging-port=0", "--no-sandbox", f"--user-data-dir={profile}",
            f"--window-size={width},{height}", "--no-first-run", "--no-default-browser-check",
            "--disable-gpu", "--disable-extensions", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--disable-crash-reporter", "--mute-audio",
            "--hide-scrollbars", "--force-device-scale-factor=1",
            # A page in the background must keep drawing frames at full rate.
            "--disable-background-timer-throttling", "--disable-renderer-backgrounding",
            "--disable-backgrounding-occluded-windows",
            "about:blank",
        ]
        proc = await asyncio.create_subprocess_exec(exe, *args, stdin=asyncio.subprocess.DEVNULL,
                                                    stdout=asyncio.subprocess.DEVNULL,
                                                    stderr=asyncio.subprocess.PIPE, start_new_session=True)
        tail: list[str] = []
        try:
            endpoint = await asyncio.wait_for(cls._endpoint(proc, tail), LAUNCH_TIMEOUT_S)
        except (TimeoutError, CdpError) as e:
            _kill_group(proc)
            await proc.wait()
            shutil.rmtree(profile, ignore_errors=True)
            raise CdpError(f"chromium did not start ({e or 'timeout'}): {' | '.join(tail[-5:])}") from None
        session = aiohttp.ClientSession()
        try:
            ws = await session.ws_connect(endpoint, max_msg_size=256 << 20)
        except BaseException:
            await session.close()
            _kill_group(proc)
            await proc.wait()
            shutil.rmtree(profile, ignore_errors=True)
            raise
        b = cls(proc, profile, ws, session, tail)
        b._stderr_task = asyncio.create_task(b._drain_stderr())
        return b

    @staticmethod
    async def _endpoint(proc: asyncio.subprocess.Process, tail: list[str]) -> str:
        assert proc.stderr is not None
        while True:
            line = await proc.stderr.readline()
            if not line:
                raise CdpError(f"chromium exited with {await proc.wait()}")
            text = line.decode(errors="replace").rstrip()
            tail.append(text)
            m = _ENDPOINT.search(text)
            if m:
                return m.group(1)

    async def _drain_stderr(self) -> None:
        # Chromium keeps logging to stderr; a full pipe would stall it.
        assert self.proc.stderr is not None
        while line := await self.proc.stderr.readline():
            self._stderr_tail.append(line.decode(errors="replace").rstrip())
            del self._stderr_tail[:-50]

    async def _read(self) -> None:
        try:
            async for msg in self._ws:
                if msg.type != aiohttp.WSMsgType.TEXT:
                    continue
                data = json.loads(msg.data)
                fut = self._waiting.pop(data.get("id", -1), None)
                if fut is not None and not fut.done():
                    fut.set_result(data)
        finally:
            for fut in self._waiting.values():
                if not fut.done():
                    fut.set_exception(CdpError("the DevTools connection closed"))
            self._waiting.clear()

    async def send(self, method: str, params: Mapping[str, Any] | None = None, *,
                   session_id: str | None = None, timeout: float = COMMAND_TIMEOUT_S) -> dict[str, Any]:
        """One command; its ``result``, or CdpError with the browser's error message."""
        cid = next(self._ids)
        msg: dict[str, Any] = {"id": cid, "method": method, "params": dict(params or {})}
        if session_id is not None:
            msg["sessionId"] = session_id
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiting[cid] = fut
        await self._ws.send_str(json.dumps(msg))
        try:
            reply = await asyncio.wait_for(fut, timeout)
        finally:
            self._waiting.pop(cid, None)
        if "error" in reply:
            raise CdpError(f"{method}: {reply['error'].get('message', reply['error'])}")
        result: dict[str, Any] = reply.get("result", {})
        return result

    async def new_page(self) -> Page:
        target = (await self.send("Target.createTarget", {"url": "about:blank"}))["targetId"]
        sid = (await self.send("Target.attachToTarget", {"targetId": target, "flatten": True}))["sessionId"]
        page = Page(self, str(target), str(sid))
        await page.send("Page.enable")
        await page.send("Runtime.enable")
        return page

    async def close(self) -> None:
        """Quit the browser and leave no process of it behind."""
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.send("Browser.close"), 2.0)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.proc.wait(), 3.0)
        _kill_group(self.proc)
        await self.proc.wait()
        await self._ws.close()
        await self._http.close()
        self._reader.cancel()
        if self._stderr_task is not None:
            self._stderr_task.cancel()
        await asyncio.gather(self._reader, *([self._stderr_task] if self._stderr_task else []),
                             return_exceptions=True)
        shutil.rmtree(self.profile, ignore_errors=True)

    async def __aenter__(self) -> Browser:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class Page:
    def __init__(self, browser: Browser, target_id: str, session_id: str) -> None:
        self.browser = browser
        self.target_id = target_id
        self.session_id = session_id

    async def send(self, method: str, params: Mapping[str, Any] | None = None) -> dict[str, Any]:
        return await self.browser.send(method, params, session_id=self.session_id)

    async def navigate(self, url: str, *, timeout: float = COMMAND_TIMEOUT_S) -> None:
        """Load ``url`` and wait until its document is complete."""
        got = await self.send("Page.navigate", {"url": url})
        if got.get("errorText"):
            raise CdpError(f"navigate {url}: {got['errorText']}")
        await self.wait_for("document.readyState === 'complete'", timeout=timeout)

    async def evaluate(self, expression: str, *, await_promise: bool = False) -> Any:
        """The JSON value of ``expression`` in the page; CdpError if it threw."""
        got = await self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True,
                                                   "awaitPromise": await_promise})
        if "exceptionDetails" in got:
            d = got["exceptionDetails"]
            text = d.get("exception", {}).get("description") or d.get("text", "exception")
            raise CdpError(f"evaluate {expression!r}: {text}")
        return got.get("result", {}).get("value")

    async def wait_for(self, expression: str, *, timeout: float = COMMAND_TIMEOUT_S, poll_s: float = 0.05) -> Any:
        """Poll ``expression`` until it is truthy; its value.  TimeoutError after ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            value = await self.evaluate(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                raise TimeoutError(f"{expression!r} still false after {timeout:g} s")
            await asyncio.sleep(poll_s)

    async def screenshot(self) -> bytes:
        """PNG bytes of the page's viewport."""
        got = await self.send("Page.captureScreenshot", {"format": "png"})
        return base64.b64decode(got["data"])

    async def close(self) -> None:
        await self.browser.send("Target.closeTarget", {"targetId": self.target_id})


def _kill_group(proc: asyncio.subprocess.Process) -> None:
    """SIGKILL the browser's process group (it leads its own session: start_new_session)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
