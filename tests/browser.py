"""A real headless Chromium driven over the DevTools protocol (aiohttp's websocket client):
load a page, collect console errors and failed loads, find elements, take screenshots."""

from __future__ import annotations

import asyncio
import base64
import io
import itertools
import json
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


class Page:
    def __init__(self, socket) -> None:
        self.socket = socket
        self.ids = itertools.count(1)
        self.events: list[dict] = []

    async def call(self, method: str, **params: Any) -> dict:
        message_id = next(self.ids)
        await self.socket.send_json({"id": message_id, "method": method, "params": params})
        while True:
            message = json.loads((await self.socket.receive()).data)
            if message.get("id") == message_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message["result"]
            self.events.append(message)

    async def wait_for(self, event: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while not any(e.get("method") == event for e in self.events):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(event)
            message = await asyncio.wait_for(self.socket.receive(), remaining)
            self.events.append(json.loads(message.data))

    def errors(self) -> list[str]:
        """Console errors, uncaught exceptions and failed loads seen so far."""
        found = []
        for event in self.events:
            method, params = event.get("method"), event.get("params", {})
            if method == "Runtime.exceptionThrown":
                found.append(json.dumps(params["exceptionDetails"])[:300])
            elif method == "Runtime.consoleAPICalled" and params.get("type") == "error":
                found.append(json.dumps(params.get("args"))[:300])
            elif method == "Log.entryAdded" and params["entry"]["level"] == "error":
                found.append(params["entry"]["text"])
        return found

    async def evaluate(self, expression: str) -> Any:
        result = await self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        return result["result"].get("value")

    async def screenshot(self, clip: dict | None = None) -> bytes:
        params: dict[str, Any] = {"format": "png", "captureBeyondViewport": True}
        if clip is not None:
            params["clip"] = {**clip, "scale": 1}
        return base64.b64decode((await self.call("Page.captureScreenshot", **params))["data"])


async def _inspect(url: str, screenshot: Path | None) -> dict:
    import aiohttp

    profile = tempfile.mkdtemp(prefix="chromium-")
    process = subprocess.Popen(
        [
            CHROMIUM,
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--remote-debugging-address=127.0.0.1",
            "--remote-debugging-port=0",
            f"--user-data-dir={profile}",
            "--window-size=1200,900",
            "about:blank",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        port_file = Path(profile) / "DevToolsActivePort"
        deadline = time.monotonic() + 30
        while not port_file.exists() or not port_file.read_text().strip():
            if time.monotonic() > deadline:
                raise TimeoutError("Chromium did not open its DevTools port")
            await asyncio.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://127.0.0.1:{port}/json/list") as response:
                target = next(t for t in await response.json() if t["type"] == "page")
            async with session.ws_connect(target["webSocketDebuggerUrl"], max_msg_size=0) as ws:
                page = Page(ws)
                for domain in ("Runtime", "Log", "Page"):
                    await page.call(f"{domain}.enable")
                await page.call("Page.navigate", url=url)
                await page.wait_for("Page.loadEventFired")
                images = await page.evaluate(
                    "[...document.images].map(i => { const r = i.getBoundingClientRect();"
                    " return {x: r.x + scrollX, y: r.y + scrollY, width: r.width,"
                    " height: r.height, natural: i.naturalWidth, alt: i.alt}; })"
                )
                shots = [
                    await page.screenshot({k: image[k] for k in ("x", "y", "width", "height")})
                    for image in images
                ]
                missing = await page.evaluate(
                    "[...document.querySelectorAll('.missing')].map(e => e.textContent)"
                )
                if screenshot is not None:
                    screenshot.write_bytes(await page.screenshot())
                return {
                    "errors": page.errors(),
                    "images": images,
                    "shots": shots,
                    "missing": missing,
                }
    finally:
        process.kill()
        process.wait()
        shutil.rmtree(profile, ignore_errors=True)


def inspect_page(path: Path, screenshot: Path | None = None) -> dict:
    """Load `path` in Chromium: its errors, its images (box, natural width, screenshot of the
    box), the texts of `.missing` notes; a full-page screenshot to `screenshot` if given."""
    return asyncio.run(_inspect(path.resolve().as_uri(), screenshot))


def ink(png: bytes) -> float:
    """Share of a screenshot's pixels that differ from its most common colour."""
    import numpy as np
    from PIL import Image

    pixels = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).reshape(-1, 3)
    _, counts = np.unique(pixels, axis=0, return_counts=True)
    return 1 - counts.max() / len(pixels)
