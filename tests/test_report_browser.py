"""The report in a real browser: headless Chromium renders it with no console errors and no network request,
the galleries show the expected images in the expected order, and the threshold control changes what is shown.

Driven over Chromium's DevTools protocol on a pipe (``--remote-debugging-pipe``: NUL-separated JSON on fds 3
and 4), so no driver package is needed. Skips, saying why, where /usr/bin/chromium is absent (``.ci/run``
installs Debian's ``chromium``). The screenshot stays in the test's tmp folder.
"""
from __future__ import annotations

import base64
import fcntl
import json
import os
import queue
import subprocess
import threading
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from ipiqa.runtime.results.commands import report_cmd
from test_report import BY_QUALITY, SCENARIO, write_scenario

CHROMIUM = Path("/usr/bin/chromium")
pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason="no /usr/bin/chromium (apt-get install -y chromium)")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--disable-extensions",
         "--remote-debugging-pipe"]
TIMEOUT = 60.0


class Browser:
    """A headless Chromium and one page, driven by DevTools commands over the pipe."""

    def __init__(self, profile: Path):
        to_child_r, self._to_child = os.pipe()
        self._from_child, from_child_w = os.pipe()

        def fds() -> None:  # in the child: the pipe ends where Chromium looks for them, fds 3 and 4
            # Copied above 10 first: a pipe end may itself be fd 3 or 4, and dup2 onto itself would keep it
            # close-on-exec (and the second dup2 could overwrite the first's source).
            high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in (to_child_r, from_child_w)]
            for target, fd in zip((3, 4), high):
                os.dup2(fd, target)
                os.close(fd)

        self.proc = subprocess.Popen([str(CHROMIUM), *FLAGS, f"--user-data-dir={profile}", "about:blank"],
                                     preexec_fn=fds, close_fds=False, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=open(profile.parent / "chromium.log", "wb"))
        os.close(to_child_r)
        os.close(from_child_w)
        self._id, self.events, self._replies = 0, [], queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        target = self.send("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.send("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        for domain in ("Page", "Runtime", "Log", "Network"):
            self.send(f"{domain}.enable", session=True)

    def _read(self) -> None:
        buf = b""
        while True:
            chunk = os.read(self._from_child, 1 << 16)
            if not chunk:
                self._replies.put(None)
                return
            buf += chunk
            while b"\0" in buf:
                raw, buf = buf.split(b"\0", 1)
                msg = json.loads(raw)
                if "id" in msg:
                    self._replies.put(msg)
                else:
                    self.events.append(msg)

    def send(self, method: str, session: bool = False, **params) -> dict:
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params}
        if session:
            msg["sessionId"] = self.session
        os.write(self._to_child, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + TIMEOUT
        while True:
            reply = self._replies.get(timeout=max(deadline - time.monotonic(), 0.1))
            if reply is None:
                raise RuntimeError("chromium closed the pipe")
            if reply["id"] == self._id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})

    def js(self, expression: str):
        result = self.send("Runtime.evaluate", session=True, expression=expression, returnByValue=True,
                           awaitPromise=True)
        if "exceptionDetails" in result:
            raise AssertionError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def open(self, url: str) -> None:
        self.send("Page.navigate", session=True, url=url)
        deadline = time.monotonic() + TIMEOUT
        while self.js("document.readyState + (document.body && document.body.getAttribute('data-ready'))") != "complete1":
            if time.monotonic() > deadline:
                raise AssertionError(f"{url} did not finish loading")
            time.sleep(0.05)

    def problems(self) -> list[str]:
        """Console errors, uncaught exceptions and error log entries seen so far."""
        out = []
        for e in self.events:
            m, p = e.get("method"), e.get("params", {})
            if m == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
                out.append(f"console.{p['type']}: {[a.get('value', a.get('description')) for a in p.get('args', [])]}")
            elif m == "Runtime.exceptionThrown":
                out.append(f"exception: {p['exceptionDetails'].get('exception', {}).get('description')}")
            elif m == "Log.entryAdded" and p["entry"]["level"] == "error":
                out.append(f"log: {p['entry']['text']}")
        return out

    def requests(self) -> list[str]:
        return [e["params"]["request"]["url"] for e in self.events if e.get("method") == "Network.requestWillBeSent"]

    def close(self) -> None:
        try:
            self.send("Browser.close")
        except (RuntimeError, queue.Empty, OSError):
            pass
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._to_child)
        os.close(self._from_child)


@pytest.fixture()
def browser(tmp_path):
    b = Browser(tmp_path / "profile")
    yield b
    b.close()


def gallery(b: Browser, key: str, visible_only: bool = True) -> list[str]:
    sel = f'[data-gallery="{key}"] .card' + (":not([hidden])" if visible_only else "")
    return b.js(f"Array.from(document.querySelectorAll('{sel}')).map(c => c.getAttribute('data-image').split('/').pop())")


def type_threshold(b: Browser, text: str) -> None:
    """As a user does: focus the number box, select its text, type."""
    b.js("(() => { const v = document.getElementById('thr-value'); v.focus(); v.select(); })()")
    b.send("Input.insertText", session=True, text=text)


def test_report_renders_offline_and_the_threshold_filters_the_gallery(tmp_path, browser):
    scores = write_scenario(tmp_path / "run")
    page = tmp_path / "report.html"
    result = CliRunner().invoke(report_cmd, [str(scores), "-o", str(page), "-q", "-n", "3"])
    assert result.exit_code == 0, result.output
    browser.send("Emulation.setDeviceMetricsOverride", session=True, width=1200, height=900, deviceScaleFactor=1,
                 mobile=False)
    browser.open(page.as_uri())

    expected = [r[0] for r in BY_QUALITY[::-1]]  # the sample gallery: all 8 scored rows, best first
    assert gallery(browser, "worst") == [r[0] for r in BY_QUALITY[:3]]
    assert gallery(browser, "best") == expected[:3]
    assert gallery(browser, "sample") == expected
    assert browser.js("Array.from(document.images).every(i => i.complete && i.naturalWidth > 0)"), "a thumbnail failed"
    assert browser.js("document.getElementById('visible-count').textContent") == "8"

    type_threshold(browser, "0.6")
    assert gallery(browser, "sample") == [n for n, _, q, _ in BY_QUALITY[::-1] if q >= 0.6]  # 4: fox1 car2 fox3 tree0
    assert browser.js("document.getElementById('visible-count').textContent") == "4"
    assert browser.js("document.getElementById('file-count').textContent") == "4 of 8"
    assert "--min quality=0.6" in browser.js("document.getElementById('select-cmd').textContent")
    assert browser.js("document.querySelector('svg.hist[data-output=quality] .thr').getAttribute('visibility')") == "visible"
    assert browser.js("document.getElementById('count-worst').textContent") == "0 of 3 shown"

    browser.js("document.getElementById('thr-invert').click()")  # show what the threshold drops
    assert gallery(browser, "sample") == [n for n, _, q, _ in BY_QUALITY[::-1] if q < 0.6]
    browser.js("document.getElementById('thr-invert').click()")

    shot = browser.send("Page.captureScreenshot", session=True, format="png", captureBeyondViewport=True)
    (tmp_path / "report.png").write_bytes(base64.b64decode(shot["data"]))
    assert (tmp_path / "report.png").stat().st_size > 10_000

    assert browser.problems() == []
    assert [u for u in browser.requests() if not u.startswith(("file:", "data:", "about:"))] == []


def test_threshold_from_the_url_hash_and_per_output(tmp_path, browser):
    scores = write_scenario(tmp_path / "run")
    page = tmp_path / "report.html"
    assert CliRunner().invoke(report_cmd, [str(scores), "-o", str(page), "-q"]).exit_code == 0
    browser.open(page.as_uri() + "#alignment=0.7")
    assert browser.js("document.getElementById('thr-output').value") == "alignment"
    kept = sorted(n for n, _, q, a in SCENARIO if q is not None and a >= 0.7)
    assert sorted(gallery(browser, "sample")) == kept
    assert browser.problems() == []

