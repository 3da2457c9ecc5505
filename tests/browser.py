"""Open a page in headless Chromium and report what a person's browser would see.

:func:`open_page` starts the Debian ``chromium`` binary with a throw-away profile and no background
networking, drives it over the DevTools protocol (a websocket from ``websocket-client``), loads a
local file, and returns every console message, uncaught exception and network request of the page,
the values of a few JavaScript expressions evaluated in it, and optionally a PNG screenshot. The
browser process is always ended, by its own pid.
"""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--disable-dev-shm-usage",
    "--hide-scrollbars",
    "--mute-audio",
)


def find_chromium() -> str | None:
    for name in CANDIDATES:
        path = shutil.which(name)
        if path:
            return path
    return None


def missing_reason() -> str | None:
    """Why browser tests cannot run here, or None when they can."""
    if find_chromium() is None:
        return "chromium is not installed (apt-get install chromium)"
    try:
        import websocket  # noqa: F401
    except ImportError:
        return "websocket-client is not installed (pip install websocket-client)"
    return None


@dataclass
class PageReport:
    console: list[dict[str, str]] = field(default_factory=list)  # {"level", "text", "source"}
    exceptions: list[str] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)  # every URL the page asked for
    failed: list[str] = field(default_factory=list)  # "url: reason" of failed or blocked loads
    values: dict[str, Any] = field(default_factory=dict)
    screenshots: list[Path] = field(default_factory=list)

    @property
    def errors(self) -> list[str]:
        found = [
            f"console {m['level']}: {m['text']}" for m in self.console if m["level"] in ("error", "assert")
        ]
        return found + [f"exception: {e}" for e in self.exceptions]

    @property
    def network(self) -> list[str]:
        """Requests that would leave the machine (anything but the file itself and data: URIs)."""
        return [u for u in self.requests if not u.startswith(("data:", "file:", "about:"))]


class _DevTools:
    def __init__(self, url: str, timeout: float) -> None:
        import websocket

        self.ws = websocket.create_connection(
            url, timeout=timeout, suppress_origin=True, enable_multithread=False
        )
        self.next_id = 0
        self.events: list[dict[str, Any]] = []

    def call(
        self,
        method: str,
        params: dict[str, Any] | None = None,
        session: str | None = None,
        timeout: float = 30.0,
    ) -> dict[str, Any]:
        self.next_id += 1
        message: dict[str, Any] = {"id": self.next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        self.ws.settimeout(timeout)
        self.ws.send(json.dumps(message))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            reply = json.loads(self.ws.recv())
            if reply.get("id") == self.next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            if "method" in reply:
                self.events.append(reply)
        raise TimeoutError(f"no answer to {method} within {timeout} s")

    def wait_for(self, method: str, timeout: float) -> bool:
        if any(e.get("method") == method for e in self.events):
            return True
        import websocket

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.ws.settimeout(max(0.05, deadline - time.monotonic()))
            try:
                event = json.loads(self.ws.recv())
            except websocket.WebSocketTimeoutException:
                break
            if "method" in event:
                self.events.append(event)
                if event["method"] == method:
                    return True
        return False

    def drain(self, seconds: float) -> None:
        """Collect events that arrive within ``seconds`` (late console messages, blocked loads)."""
        self.wait_for("\0never", seconds)

    def close(self) -> None:
        try:
            self.ws.close()
        except OSError:
            pass


def open_page(
    path: Path,
    *,
    width: int = 1280,
    height: int = 4000,
    evaluate: dict[str, str] | None = None,
    screenshots: dict[str, tuple[int, int]] | None = None,
    timeout: float = 60.0,
) -> PageReport:
    """Load ``path`` in headless Chromium at ``width`` x ``height`` CSS pixels and report on it.

    ``evaluate`` maps names to JavaScript expressions whose JSON-able values land in ``values``.
    ``screenshots`` maps PNG output paths to ``(top, height)`` page regions to capture.
    """
    binary = find_chromium()
    if binary is None:
        raise RuntimeError("chromium is not installed")
    profile = Path(tempfile.mkdtemp(prefix="visa-chromium-"))
    log = (profile / "stderr.log").open("wb")
    proc = subprocess.Popen(
        [
            binary,
            *FLAGS,
            f"--user-data-dir={profile}",
            "--remote-debugging-port=0",
            f"--window-size={width},{height}",
            "about:blank",
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=log,
    )
    tools: _DevTools | None = None
    report = PageReport()
    try:
        port, browser_path = _devtools_port(proc, profile, timeout)
        tools = _DevTools(f"ws://127.0.0.1:{port}{browser_path}", timeout)
        target = tools.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = tools.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for method in ("Runtime.enable", "Log.enable", "Network.enable", "Page.enable"):
            tools.call(method, session=session)
        tools.call(
            "Emulation.setDeviceMetricsOverride",
            {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False},
            session=session,
        )
        tools.events.clear()
        tools.call("Page.navigate", {"url": Path(path).resolve().as_uri()}, session=session)
        if not tools.wait_for("Page.loadEventFired", timeout):
            raise TimeoutError(f"{path} did not finish loading within {timeout} s")
        tools.drain(0.5)
        for name, expression in (evaluate or {}).items():
            result = tools.call(
                "Runtime.evaluate", {"expression": expression, "returnByValue": True}, session=session
            )
            if "exceptionDetails" in result:
                raise RuntimeError(f"evaluating {name}: {result['exceptionDetails'].get('text')}")
            report.values[name] = result["result"].get("value")
        for out, (top, shot_height) in (screenshots or {}).items():
            _screenshot(tools, session, Path(out), (0, top, width, shot_height))
            report.screenshots.append(Path(out))
        _collect(tools.events, report)
        try:
            tools.call("Browser.close", timeout=5)
        except (RuntimeError, TimeoutError, OSError):
            pass
    finally:
        if tools is not None:
            tools.close()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        log.close()
        shutil.rmtree(profile, ignore_errors=True)
    return report


def _devtools_port(proc: subprocess.Popen[bytes], profile: Path, timeout: float) -> tuple[str, str]:
    """Wait for Chromium to write its DevTools port and browser path into the profile."""
    port_file = profile / "DevToolsActivePort"
    deadline = time.monotonic() + timeout
    while not (port_file.is_file() and len(port_file.read_text().splitlines()) >= 2):
        if proc.poll() is not None:
            raise RuntimeError(
                f"chromium exited with {proc.returncode}: "
                f"{(profile / 'stderr.log').read_text(errors='replace')[-2000:]}"
            )
        if time.monotonic() > deadline:
            raise TimeoutError("chromium did not open its DevTools port")
        time.sleep(0.05)
    port, browser_path = port_file.read_text().splitlines()[:2]
    return port, browser_path


def _screenshot(tools: _DevTools, session: str, out: Path, region: tuple[int, int, int, int]) -> None:
    """Capture the page region ``(x, y, width, height)`` (CSS pixels) as a PNG at ``out``."""
    x, y, width, height = region
    shot = tools.call(
        "Page.captureScreenshot",
        {
            "format": "png",
            "captureBeyondViewport": True,
            "clip": {"x": x, "y": y, "width": width, "height": height, "scale": 1},
        },
        session=session,
    )
    out.write_bytes(base64.b64decode(shot["data"]))


def _collect(events: list[dict[str, Any]], report: PageReport) -> None:
    for event in events:
        method, params = event.get("method"), event.get("params", {})
        if method == "Runtime.consoleAPICalled":
            text = " ".join(str(a.get("value", a.get("description", ""))) for a in params.get("args", []))
            report.console.append({"level": params.get("type", ""), "text": text, "source": "console-api"})
        elif method == "Log.entryAdded":
            entry = params.get("entry", {})
            report.console.append(
                {
                    "level": entry.get("level", ""),
                    "text": entry.get("text", ""),
                    "source": entry.get("source", ""),
                }
            )
        elif method == "Runtime.exceptionThrown":
            details = params.get("exceptionDetails", {})
            report.exceptions.append(
                details.get("exception", {}).get("description") or details.get("text", "")
            )
        elif method == "Network.requestWillBeSent":
            report.requests.append(params.get("request", {}).get("url", ""))
        elif method == "Network.loadingFailed":
            report.failed.append(
                f"{params.get('requestId')}: {params.get('blockedReason') or params.get('errorText')}"
            )
