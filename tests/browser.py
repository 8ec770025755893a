"""Headless Chromium driven over the DevTools protocol (a websocket), for what browsers really see."""

from __future__ import annotations

import base64
import contextlib
import json
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
from websockets.sync.client import ClientConnection, connect

from tests.conftest import free_port

FLAGS = [
    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-default-apps", "--disable-extensions", "--mute-audio", "--remote-debugging-address=127.0.0.1",
]  # fmt: skip


def chromium_binary() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    raise RuntimeError("Chromium is not installed (Debian: apt-get install chromium); .ci/run installs it")


class Browser:
    """One Chromium process and one page; `events` collects every DevTools event of that page."""

    def __init__(self) -> None:
        self.port = free_port()
        self.profile = Path(tempfile.mkdtemp(prefix="chromium-"))
        self.proc: subprocess.Popen[bytes] | None = None
        self.ws: ClientConnection | None = None
        self.events: list[dict[str, Any]] = []
        self._next_id = 0
        self._stack = contextlib.ExitStack()

    def start(self, timeout: float = 30.0) -> Browser:
        args = [chromium_binary(), *FLAGS, f"--remote-debugging-port={self.port}",
                f"--user-data-dir={self.profile}", "about:blank"]  # fmt: skip
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError, ValueError, StopIteration):
                targets = httpx.get(f"http://127.0.0.1:{self.port}/json/list", timeout=1).json()
                page = next(t for t in targets if t["type"] == "page")
                self.ws = self._stack.enter_context(
                    connect(page["webSocketDebuggerUrl"], max_size=64 * 1024 * 1024, open_timeout=5)
                )
                for domain in ("Page", "Network", "Runtime", "Log"):
                    self.call(f"{domain}.enable")
                return self
            time.sleep(0.1)
        self.stop()
        raise RuntimeError("Chromium's DevTools endpoint did not come up")

    def call(self, method: str, params: dict[str, Any] | None = None, timeout: float = 30.0) -> dict[str, Any]:
        assert self.ws is not None
        self._next_id += 1
        self.ws.send(json.dumps({"id": self._next_id, "method": method, "params": params or {}}))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            message = json.loads(self.ws.recv(timeout=max(0.01, deadline - time.monotonic())))
            if message.get("id") == self._next_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return dict(message.get("result", {}))
            self.events.append(message)
        raise TimeoutError(method)

    def wait_for_event(self, method: str, timeout: float = 30.0) -> dict[str, Any]:
        assert self.ws is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for event in self.events:
                if event.get("method") == method:
                    self.events.remove(event)
                    return event
            with contextlib.suppress(TimeoutError):
                self.events.append(json.loads(self.ws.recv(timeout=max(0.01, deadline - time.monotonic()))))
        raise TimeoutError(method)

    def open(self, url: str, width: int, height: int, scale: float = 1.0) -> None:
        self.call("Emulation.setDeviceMetricsOverride",
                  {"width": width, "height": height, "deviceScaleFactor": scale, "mobile": False})  # fmt: skip
        self.call("Page.navigate", {"url": url})
        self.wait_for_event("Page.loadEventFired")

    def evaluate(self, expression: str) -> Any:
        result = self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True, "awaitPromise": True})
        if "exceptionDetails" in result:
            raise RuntimeError(result["exceptionDetails"])
        return result["result"].get("value")

    def wait_until(self, expression: str, timeout: float = 30.0) -> Any:
        """Poll a page expression until it is truthy (bounded); its value."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.evaluate(expression)
            if value:
                return value
            time.sleep(0.05)
        raise TimeoutError(f"never true: {expression}")

    def fill(self, selector: str, value: str) -> None:
        """Set a form field's value as typing does (fires its input event)."""
        field = f"document.querySelector({json.dumps(selector)})"
        typed = "f.dispatchEvent(new Event('input', {bubbles: true}))"
        self.evaluate(f"(f => {{ f.value = {json.dumps(value)}; {typed}; }})({field})")

    def set_files(self, selector: str, paths: list[Path]) -> None:
        """Choose files in an `<input type=file>` as a user would (fires its change event)."""
        root = self.call("DOM.getDocument")["root"]["nodeId"]
        node = self.call("DOM.querySelector", {"nodeId": root, "selector": selector})["nodeId"]
        self.call("DOM.setFileInputFiles", {"nodeId": node, "files": [str(p) for p in paths]})

    def screenshot(self, path: Path) -> Path:
        data = self.call("Page.captureScreenshot", {"format": "png"})["data"]
        path.write_bytes(base64.b64decode(data))
        return path

    def console_errors(self) -> list[str]:
        errors = []
        for event in self.events:
            if event.get("method") == "Log.entryAdded" and event["params"]["entry"]["level"] == "error":
                errors.append(event["params"]["entry"]["text"])
            if event.get("method") == "Runtime.consoleAPICalled" and event["params"]["type"] == "error":
                errors.append(str(event["params"]["args"]))
        return errors

    def responses(self) -> dict[str, dict[str, Any]]:
        """url -> the response Chromium received (status, mimeType, headers)."""
        return {
            e["params"]["response"]["url"]: e["params"]["response"]
            for e in self.events
            if e.get("method") == "Network.responseReceived"
        }

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self._stack.close()
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        shutil.rmtree(self.profile, ignore_errors=True)


def running_browser() -> Iterator[Browser]:
    """A started headless Chromium, stopped afterwards: `pytest.fixture(running_browser, name="browser")`."""
    chromium = Browser().start()
    yield chromium
    chromium.stop()
