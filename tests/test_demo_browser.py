"""The demo page in a real browser: start `vidaccel demo --tiny wan --steps 2` on a free loopback port, drive
headless Chromium with Playwright through a generation and an invalid size, check what is served, save a screenshot
to test-artifacts/, and stop the server."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

CHROMIUM = "/usr/bin/chromium"
REPOSITORY = Path(__file__).resolve().parents[1]
ARTIFACTS = REPOSITORY / "test-artifacts"
START_TIMEOUT_S = 240  # importing torch/diffusers/gradio and building the pipeline on a busy 2-core runner
GENERATE_TIMEOUT_MS = 120_000

pytest.importorskip("gradio", reason="the demo needs gradio (pip install 'vidaccel[demo]')")
sync_api = pytest.importorskip("playwright.sync_api",
                               reason="Python Playwright is not installed (pip install playwright)")
if not os.access(CHROMIUM, os.X_OK):
    pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install -y chromium)", allow_module_level=True)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _get(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


class DemoServer:
    """`vidaccel demo --tiny wan --steps 2` (one torch thread) on a free loopback port, its output in a log file."""

    def __init__(self, log_path: Path):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        self.log_path = log_path
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
        with open(log_path, "w") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "vidaccel.cli", "demo", "--tiny", "wan", "--steps", "2", "--device", "cpu",
                 "--threads", "1", "--port", str(self.port)],
                # Not the checkout root: `python -m` puts the working directory on sys.path, and the checkout's
                # kernels/ folder would then hide Hugging Face's `kernels` package that transformers imports.
                cwd=log_path.parent, stdout=log, stderr=subprocess.STDOUT, env=env)
        self.work_dir: Path | None = None

    def log(self) -> str:
        return self.log_path.read_text()

    def wait_until_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if self.process.poll() is not None:
                pytest.fail(f"the demo exited with {self.process.returncode}:\n{self.log()}")
            try:
                if _get(self.url) == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"the demo did not answer within {START_TIMEOUT_S} s:\n{self.log()}")
            time.sleep(1)
        self.work_dir = Path(re.search(r"serving files from (\S+) only", self.log()).group(1))

    def stop(self) -> int:
        """SIGTERM, which the app treats as Ctrl-C; the exit status."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    demo = DemoServer(tmp_path_factory.mktemp("demo-server") / "server.log")
    try:
        demo.wait_until_ready()
        yield demo
    finally:
        demo.stop()


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, headless=True)
        yield chromium
        chromium.close()


def _video_ready(page, selector: str) -> dict:
    page.wait_for_function(
        f"() => {{ const v = document.querySelector('{selector} video'); return v && v.readyState >= 1; }}",
        timeout=GENERATE_TIMEOUT_MS)
    return page.evaluate(
        f"() => {{ const v = document.querySelector('{selector} video');"
        " return {src: v.currentSrc, width: v.videoWidth, height: v.videoHeight, duration: v.duration}; }")


def test_generate_in_the_browser(server, browser):
    url, work_dir = server.url, server.work_dir
    page = browser.new_page(viewport={"width": 1400, "height": 1100})
    page.goto(url)
    page.locator("#generate").wait_for()
    page.wait_for_function("() => document.title === 'vidaccel demo'")
    assert page.locator("h1").first.inner_text() == "vidaccel: dense vs accelerated"
    page.locator("#prompt textarea").fill("a blue square moves up")
    page.locator("#generate").click()

    dense, fast = _video_ready(page, "#dense-video"), _video_ready(page, "#accelerated-video")
    for video in (dense, fast):  # decoded by the browser: 9 frames at 16 fps, 32x32
        assert (video["width"], video["height"]) == (32, 32)
        assert video["duration"] == pytest.approx(9 / 16, abs=0.07)
    page.wait_for_function("() => document.querySelector('#metrics').innerText.includes('Speedup')",
                           timeout=GENERATE_TIMEOUT_MS)
    metrics = page.locator("#metrics").inner_text()
    for label in ("Wall time", "Speedup", "PSNR vs dense", "SSIM vs dense", "Attention density", "Peak memory"):
        assert label in metrics
    assert re.search(r"Speedup\s+1\.00×\s+[0-9.]+×", metrics)
    assert page.locator("#step-plot img").first.is_visible()

    # Add DBCache in the Advanced panel (warm-up 1, a threshold that caches every later step): the dense video of
    # these settings comes from the cache and the accelerated run reuses the middle blocks at step 1.
    page.get_by_text("Advanced: methods").click()
    page.locator("#cache").get_by_label("dbcache").check()
    for control, value in (("#dbcache-warmup", "1"), ("#dbcache-threshold", "1")):
        box = page.locator(f"{control} input[type=number]")
        box.fill(value)
        box.press("Enter")
    page.locator("#generate").click()
    page.wait_for_function("() => document.querySelector('#metrics').innerText.includes('(cached run)')",
                           timeout=GENERATE_TIMEOUT_MS)
    metrics = page.locator("#metrics").inner_text()
    # the page opens on the demo's default preset ("balanced" now that the combined presets exist)
    assert "2 computed, 2 cached" in metrics and "balanced (modified)" in metrics and "dbcache" in metrics
    dense_again = _video_ready(page, "#dense-video")
    assert Path(dense_again["src"]).name == Path(dense["src"]).name  # the same dense file, not a new run

    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "demo.png"), full_page=True)

    # Served: the videos the app wrote, from its own folder. Not served: anything else.
    assert all(str(work_dir) in video["src"] and _get(video["src"]) == 200 for video in (dense, fast))
    assert _get(f"{url}gradio_api/file={REPOSITORY / 'README.md'}") == 403
    assert _get(f"{url}gradio_api/file=/etc/passwd") == 403
    page.close()


def test_invalid_size_is_shown_as_a_message(server, browser):
    url = server.url
    page = browser.new_page(viewport={"width": 1400, "height": 1100})
    page.goto(url)
    for control, value in (("#frames", "17"), ("#height", "48")):
        box = page.locator(f"{control} input[type=number]")
        box.fill(value)
        box.press("Enter")
    page.locator("#generate").click()
    toast = page.locator("[data-testid=toast-text]").first
    toast.wait_for(timeout=GENERATE_TIMEOUT_MS)
    text = toast.inner_text()
    assert "17 frames at 32x48 make 30 video tokens; this demo allows at most 24" in text
    assert "Traceback" not in page.content()
    page.screenshot(path=str(ARTIFACTS / "demo-invalid-size.png"))
    page.close()


def test_stopping_the_server_removes_its_folder(server):
    """Last in this module: SIGTERM ends the server like Ctrl-C, and its temporary folder goes with it."""
    assert server.work_dir.is_dir()
    assert server.stop() == 0, server.log()
    assert not server.work_dir.exists()
    assert "closing server" in server.log()
