"""The daemon under a (test) service manager: sd_notify, watchdog, SIGHUP reload, drain.

In-process tests drive :class:`Daemon` with real engines and a notify socket
the test listens on; the subprocess test runs ``python -m edgevoice serve`` the
way systemd does (``NOTIFY_SOCKET``, ``WATCHDOG_USEC``, ``JOURNAL_STREAM``) and
talks to whatever protocol servers the daemon has (Wyoming / HTTP).
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import re
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import aiohttp
import numpy as np
import pytest

from edgevoice.audio import decode, encode
from edgevoice.config import ConfigError, ModelConfig, Settings
from edgevoice.daemon import PROTOCOLS, Daemon
from edgevoice.engines.base import EngineKind
from edgevoice.sdnotify import SystemdNotifier
from tests.conftest import LAMP_TEXT, LAMP_WAV, LIGHT_EN_TEXT, LIGHT_EN_WAV, TINY_EN, words

pytestmark = pytest.mark.slow


class NotifyListener:
    """The service manager's end of ``$NOTIFY_SOCKET``: reads every message at once.

    Like systemd it never lets the socket's queue fill (Linux keeps only 10
    unread datagrams; the notifier gives up on a full queue).
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.setblocking(False)
        self.messages: list[dict[str, str]] = []
        """Messages the test has taken with :meth:`next`."""
        self._queue: asyncio.Queue[dict[str, str]] = asyncio.Queue()
        self._reader: asyncio.Task[None] | None = None

    async def __aenter__(self) -> NotifyListener:
        self._reader = asyncio.create_task(self._read())
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)
        self.sock.close()

    async def _read(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            data = await loop.sock_recv(self.sock, 4096)
            self._queue.put_nowait(dict(line.split("=", 1) for line in data.decode().splitlines()))

    async def next(self, timeout_s: float = 60.0) -> dict[str, str]:
        message = await asyncio.wait_for(self._queue.get(), timeout_s)
        self.messages.append(message)
        return message

    def pending(self) -> list[dict[str, str]]:
        """Messages received but not taken yet (taken now)."""
        out = []
        while not self._queue.empty():
            out.append(self._queue.get_nowait())
        return out

    async def until(self, key: str, timeout_s: float = 120.0) -> dict[str, str]:
        """The next message carrying ``key``; WATCHDOG pings in between are kept."""
        async with asyncio.timeout(timeout_s):
            while True:
                message = await self.next(timeout_s)
                if key in message:
                    return message


@pytest.fixture
async def listener(tmp_path: Path) -> AsyncIterator[NotifyListener]:
    async with NotifyListener(tmp_path / "notify.sock") as sock:
        yield sock


def _non_watchdog(listener: NotifyListener) -> list[dict[str, str]]:
    return [m for m in listener.messages if "WATCHDOG" not in m]


async def test_ready_watchdog_reload_and_stop(
    make_settings: Callable[..., Settings], listener: NotifyListener, shared_cache: Path
) -> None:
    first = make_settings(asr=[TINY_EN], tts=[], wake=[], vad=[], cache_dir=shared_cache)
    configs: list[Settings | Exception] = []

    def loader() -> Settings:
        item = configs.pop(0)
        if isinstance(item, Exception):
            raise item
        return item

    notifier = SystemdNotifier({"NOTIFY_SOCKET": str(listener.path), "WATCHDOG_USEC": "100000"})
    assert notifier.watchdog_interval_s == 0.05
    daemon = Daemon(first, notifier=notifier, config_loader=loader)
    run = asyncio.create_task(daemon.run())
    try:
        ready = await listener.until("READY")
        # READY only once the engine is loaded and serving.
        assert daemon.ready.is_set()
        assert ready["STATUS"] == "Running (no protocol enabled) — models: tiny-en"
        assert [m.get("STATUS") for m in _non_watchdog(listener)] == [
            "Loading models…",
            "Models loaded; starting listeners",
            ready["STATUS"],
        ]
        assert daemon.hub is not None
        hub = daemon.hub
        lamp = await asyncio.to_thread(decode, LAMP_WAV)
        assert (await hub.transcribe(lamp)).text == LAMP_TEXT

        # The watchdog keeps pinging (every 50 ms here) from the event loop.
        pings = 0
        while pings < 3:
            pings += "WATCHDOG" in await listener.next(5)

        # Reload 1: an alias added, the same model: the loaded engine is kept.
        slot = hub.asr().slot
        configs.append(
            make_settings(
                asr=[TINY_EN.model_copy(update={"aliases": ["whisper-1", "stt"]})],
                tts=[],
                wake=[],
                vad=[],
                cache_dir=shared_cache,
            )
        )
        daemon.request_reload()
        reloading = await listener.until("RELOADING")
        assert int(reloading["MONOTONIC_USEC"]) > 0
        assert reloading["STATUS"] == "Reloading configuration"
        assert "READY" in await listener.until("READY")
        assert hub.asr("stt").slot is slot
        assert daemon.settings.asr[0].aliases == ["whisper-1", "stt"]

        # Reload 2: changed engine options load a new engine while a request runs
        # on the old one; the old request completes, new requests use the new one.
        changed = TINY_EN.model_copy(update={"options": {"beam_size": 2}})
        configs.append(
            make_settings(asr=[changed], tts=[], wake=[], vad=[], cache_dir=shared_cache)
        )
        in_flight = asyncio.create_task(hub.transcribe(lamp))
        await asyncio.sleep(0)  # the request picks its engine before the reload
        daemon.request_reload()
        await listener.until("READY")
        assert (await in_flight).text == LAMP_TEXT
        new_slot = hub.asr().slot
        assert new_slot is not slot
        light = await asyncio.to_thread(decode, LIGHT_EN_WAV)
        assert (await hub.transcribe(light)).text == LIGHT_EN_TEXT
        await hub.wait_retired()
        assert slot.engine is None  # the old engine was closed once idle
        assert [s.key for s in hub.slots()] == [new_slot.key]

        # Reloads 3-5: a broken file, an unknown engine, a model that does not load
        # are rejected; the running configuration stays.
        configs.append(ConfigError("invalid configuration: log_level: bad"))
        configs.append(
            make_settings(
                asr=[ModelConfig(name="x", engine="no-such-engine", model="m")],
                tts=[],
                wake=[],
                vad=[],
                cache_dir=shared_cache,
            )
        )
        # A model that fails to load: the engines loaded next to it are dropped.
        broken = ModelConfig(name="broken", engine="faster-whisper", model="/nonexistent")
        configs.append(
            make_settings(
                asr=[changed, TINY_EN.model_copy(update={"name": "t2", "aliases": []}), broken],
                tts=[],
                wake=[],
                vad=[],
                cache_dir=shared_cache,
            )
        )
        for _ in range(3):
            reloads = daemon.reloads
            daemon.request_reload()
            await listener.until("RELOADING")
            rejected = await listener.until("READY")
            assert rejected["STATUS"].endswith("(reload rejected: see log)")
            assert daemon.reloads == reloads + 1
        assert hub.asr().slot is new_slot
        assert hub.slots() == [new_slot]
        assert daemon.settings.asr == [changed]
        assert (await hub.transcribe(light)).text == LIGHT_EN_TEXT

        # Stop: STOPPING=1, an in-flight request still completes, run() returns.
        in_flight = asyncio.create_task(hub.transcribe(lamp))
        await asyncio.sleep(0)
        daemon.request_stop()
        stopping = await listener.until("STOPPING")
        assert stopping["STATUS"].startswith("Stopping: finishing in-flight requests")
        assert (await in_flight).text == LAMP_TEXT
        await asyncio.wait_for(run, 30)
        assert hub.models(EngineKind.ASR) == []
    finally:
        if not run.done():
            run.cancel()
            await asyncio.gather(run, return_exceptions=True)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


async def test_reload_restarts_changed_protocol_servers(
    make_settings: Callable[..., Settings],
    listener: NotifyListener,
    shared_cache: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    port = _free_port()

    def settings(**http: object) -> Settings:
        return make_settings(
            asr=[TINY_EN], tts=[], wake=[], vad=[], cache_dir=shared_cache,
            http={"enabled": True, "host": "127.0.0.1", "port": port, **http},
        )  # fmt: skip

    configs = [
        settings(),  # models only: the server keeps running and is told
        settings(cors_origins=["http://x.test"]),  # same listener: adopted in place
        settings(host="localhost"),  # same port, another bind: stop, then start
        settings(port=0),  # a new port: the new server starts before the old stops
        settings(enabled=False),
    ]
    notifier = SystemdNotifier({"NOTIFY_SOCKET": str(listener.path)})
    daemon = Daemon(settings(), notifier=notifier, config_loader=lambda: configs.pop(0))
    run = asyncio.create_task(daemon.run())
    try:
        ready = await listener.until("READY")
        assert f"HTTP on http://127.0.0.1:{port}" in ready["STATUS"]
        first = daemon.servers[0]
        told: list[str] = []

        async def hub_reloaded() -> None:
            told.append(first.name)

        monkeypatch.setattr(first, "hub_reloaded", hub_reloaded)
        daemon.request_reload()
        await listener.until("READY")
        assert daemon.servers == [first]
        assert told == ["http"]

        daemon.request_reload()
        ready = await listener.until("READY")
        assert f"HTTP on http://127.0.0.1:{port}" in ready["STATUS"]
        assert daemon.servers == [first]  # reconfigured, never closed
        assert daemon.settings.http.cors_origins == ["http://x.test"]

        daemon.request_reload()
        ready = await listener.until("READY")
        assert f":{port}" in ready["STATUS"]
        second = daemon.servers[0]
        assert second is not first
        assert first.addresses == []  # stopped
        assert await _connects(("127.0.0.1", port))
        assert daemon.settings.http.host == "localhost"

        daemon.request_reload()
        ready = await listener.until("READY")
        (new_address,) = _addresses(ready["STATUS"]).values()
        assert new_address[1] != port
        assert await _connects(new_address)
        assert not await _connects(("127.0.0.1", port))

        daemon.request_reload()
        ready = await listener.until("READY")
        assert ready["STATUS"] == "Running (no protocol enabled) — models: tiny-en"
        assert daemon.servers == []
        assert not await _connects(new_address)
        daemon.request_stop()
        await asyncio.wait_for(run, 30)
    finally:
        if not run.done():
            run.cancel()
            await asyncio.gather(run, return_exceptions=True)


async def test_sigterm_while_loading_never_reports_ready(
    make_settings: Callable[..., Settings], listener: NotifyListener, shared_cache: Path
) -> None:
    settings = make_settings(asr=[TINY_EN], tts=[], wake=[], vad=[], cache_dir=shared_cache)
    daemon = Daemon(settings, notifier=SystemdNotifier({"NOTIFY_SOCKET": str(listener.path)}))
    run = asyncio.create_task(daemon.run())
    assert (await listener.next())["STATUS"] == "Loading models…"
    daemon.request_stop()  # the model is loading in its worker thread
    await asyncio.wait_for(run, 60)
    assert "STOPPING" in await listener.next()
    await asyncio.sleep(0.1)
    assert listener.pending() == []  # no READY=1, no "Serving" status
    assert not daemon.ready.is_set()


async def test_no_notify_socket_is_a_no_op(make_settings: Callable[..., Settings]) -> None:
    # Outside systemd nothing is sent and nothing fails; a failing hub exits with
    # its error (systemd: Restart=on-failure).
    notifier = SystemdNotifier({})
    assert not notifier.enabled
    assert notifier.watchdog_interval_s is None
    settings = make_settings(
        asr=[ModelConfig(name="x", engine="faster-whisper", model="/nope")], tts=[], wake=[], vad=[]
    )
    daemon = Daemon(settings, notifier=notifier)
    with pytest.raises(Exception, match="asr model 'x'"):
        await daemon.run()
    assert not daemon.ready.is_set()


# --------------------------------------------------- `edgevoice serve` as a service

# Protocol servers whose listeners the subprocess test checks, with the config
# that binds them to a free loopback port.
_LISTENERS = {
    "wyoming": '[wyoming]\nenabled = true\nuri = "tcp://127.0.0.1:0"\nzeroconf = false\n',
    "http": '[http]\nenabled = true\nhost = "127.0.0.1"\nport = 0\n',
}


def _available_listeners() -> list[str]:
    registered = {section for section, _factory in PROTOCOLS}
    out = []
    for section in _LISTENERS:
        module = f"edgevoice.protocols.{section}"
        if section in registered and importlib.util.find_spec(module) is not None:
            out.append(section)
    return out


DRAIN_TIMEOUT_S = 240.0
"""The daemon's drain timeout in the service test; the in-flight work is sized from it."""


def _service_config(cache: Path, state: Path, sections: list[str], aliases: list[str]) -> str:
    lines = [
        f'cache_dir = "{cache}"',
        f'state_dir = "{state}"',
        "offline = true",
        f"shutdown_timeout_s = {DRAIN_TIMEOUT_S}",
        "tts = []",
        "wake = []",
        "vad = []",
        "",
        "[[asr]]",
        'name = "tiny-en"',
        'engine = "faster-whisper"',
        'model = "tiny.en"',
        f"aliases = {aliases!r}".replace("'", '"'),
        "",
        "[mqtt]",
        "enabled = false",
    ]
    for section, table in _LISTENERS.items():
        lines.append(table if section in sections else f"[{section}]\nenabled = false")
    return "\n".join(lines) + "\n"


def _addresses(status: str) -> dict[str, tuple[str, int]]:
    """``{"HTTP": (host, port), ...}`` from a ``STATUS=Serving ...`` line."""
    found = {}
    for label, host, port in re.findall(r"(\w+) on (?:tcp|http)://([\d.]+):(\d+)", status):
        found[label] = (host, int(port))
    return found


async def _connects(address: tuple[str, int]) -> bool:
    try:
        _reader, writer = await asyncio.open_connection(*address)
    except OSError:
        return False
    writer.close()
    await writer.wait_closed()
    return True


async def _hammer(address: tuple[str, int], stop: asyncio.Event) -> tuple[int, int]:
    """Connect over and over until ``stop``; returns (accepted, refused)."""
    accepted = refused = 0
    while not stop.is_set():
        if await _connects(address):
            accepted += 1
        else:
            refused += 1
        await asyncio.sleep(0.01)
    return accepted, refused


async def _transcribe_http(
    session: aiohttp.ClientSession, base: str, path: Path, model: str
) -> tuple[int, str]:
    form = aiohttp.FormData()
    data = await asyncio.to_thread(path.read_bytes)
    form.add_field("file", data, filename=path.name, content_type="audio/wav")
    form.add_field("model", model)
    async with session.post(f"{base}/v1/audio/transcriptions", data=form) as response:
        body = await response.json()
        return response.status, str(body.get("text", body))


async def test_serve_under_a_service_manager(
    tmp_path: Path, listener: NotifyListener, shared_cache: Path
) -> None:
    sections = _available_listeners()
    config = tmp_path / "config.toml"
    state = tmp_path / "state"
    config.write_text(_service_config(shared_cache, state, sections, ["whisper-1"]))
    stderr_path = tmp_path / "stderr.log"
    env = {
        **os.environ,
        "NOTIFY_SOCKET": str(listener.path),
        "WATCHDOG_USEC": "400000",
        "JOURNAL_STREAM": "8:4242",
    }
    env.pop("PYTHONASYNCIODEBUG", None)
    with stderr_path.open("wb") as stderr:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "edgevoice", "serve", "--config", str(config),
            env=env, stdout=asyncio.subprocess.DEVNULL, stderr=stderr,
        )  # fmt: skip
    try:
        ready = await listener.until("READY")
        listeners = _addresses(ready["STATUS"])
        labels = {"wyoming": "Wyoming", "http": "HTTP"}
        assert sorted(listeners) == sorted(labels[s] for s in sections), ready["STATUS"]
        # READY=1 arrived: every listener accepts connections already.
        for address in listeners.values():
            assert await _connects(address)
        assert [m["STATUS"] for m in _non_watchdog(listener)][:2] == [
            "Loading models…",
            "Models loaded; starting listeners",
        ]
        pings = 0
        while pings < 3:
            pings += "WATCHDOG" in await listener.next(10)

        session = aiohttp.ClientSession() if "HTTP" in listeners else None
        base = "http://{}:{}".format(*listeners["HTTP"]) if session else ""
        try:
            lamp_s = 0.0
            if session:
                started = time.monotonic()
                assert await _transcribe_http(session, base, LAMP_WAV, "whisper-1") == (
                    200,
                    LAMP_TEXT,
                )
                lamp_s = time.monotonic() - started

            # SIGHUP with a changed engine config: no listener refuses a connection.
            config.write_text(_service_config(shared_cache, state, sections, ["whisper-1", "stt"]))
            stop = asyncio.Event()
            hammers = [asyncio.create_task(_hammer(a, stop)) for a in listeners.values()]
            await asyncio.sleep(0.1)
            process.send_signal(signal.SIGHUP)
            reloading = await listener.until("RELOADING")
            assert int(reloading["MONOTONIC_USEC"]) > 0
            reloaded = await listener.until("READY")
            stop.set()
            for accepted, refused in await asyncio.gather(*hammers):
                assert refused == 0
                assert accepted > 0
            assert _addresses(reloaded["STATUS"]) == listeners
            if session:
                assert await _transcribe_http(session, base, LIGHT_EN_WAV, "stt") == (
                    200,
                    LIGHT_EN_TEXT,
                )

            # SIGHUP with a broken file: rejected, the old config keeps serving.
            config.write_text("asr = [this is not TOML\n")
            process.send_signal(signal.SIGHUP)
            await listener.until("RELOADING")
            rejected = await listener.until("READY")
            assert rejected["STATUS"].endswith("(reload rejected: see log)")
            for address in listeners.values():
                assert await _connects(address)

            # SIGTERM while a long transcription runs: STOPPING=1, it completes, exit 0.
            # The work is sized from the drain timeout and this machine's own speed
            # (the lamp request above): about a tenth of the timeout, 2 to 10 commands.
            repeats = max(2, min(10, int(DRAIN_TIMEOUT_S / 10 / max(lamp_s, 0.01))))
            long_wav = tmp_path / "long.wav"
            await asyncio.to_thread(_long_speech, long_wav, repeats)
            in_flight = (
                asyncio.create_task(_transcribe_http(session, base, long_wav, "stt"))
                if session
                else None
            )
            if session:
                # The engine has started on it (its request counter moved).
                while await _engine_requests(session, base) < 3:  # noqa: ASYNC110 (remote)
                    await asyncio.sleep(0.02)
            # Still transcribing when the signal goes (checked just before it).
            assert in_flight is None or not in_flight.done()
            process.send_signal(signal.SIGTERM)
            stopping = await listener.until("STOPPING")
            assert stopping["STATUS"] == (
                f"Stopping: finishing in-flight requests (up to {DRAIN_TIMEOUT_S:.0f} s)"
            )
            if in_flight is not None:
                status, text = await in_flight
                assert status == 200
                assert words(text)[:6] == words(LAMP_TEXT)
            assert await asyncio.wait_for(process.wait(), DRAIN_TIMEOUT_S + 60) == 0
        finally:
            if session:
                await session.close()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    log = (await asyncio.to_thread(stderr_path.read_text)).splitlines()
    # Under journald (JOURNAL_STREAM): no timestamps, journald adds them.
    assert log[0] == "INFO edgevoice.daemon: Loading models"
    assert any(line.startswith("ERROR edgevoice.daemon: Reload rejected") for line in log)
    assert log[-1] == "INFO edgevoice.daemon: Stopped"


async def _engine_requests(session: aiohttp.ClientSession, base: str) -> float:
    async with session.get(f"{base}/metrics") as response:
        text = await response.text()
    counts = re.findall(r"^edgevoice_engine_requests_total\{[^}]*\} ([\d.]+)$", text, re.M)
    return sum(float(c) for c in counts)


def _long_speech(path: Path, repeats: int) -> None:
    """Real speech: the lamp command ``repeats`` times with pauses (3.5 s each)."""
    lamp = decode(LAMP_WAV, rate_hz=16000)
    pause = np.zeros(8000, dtype=np.float32)
    samples = np.concatenate([np.concatenate([lamp.samples, pause])] * repeats)
    path.write_bytes(encode(samples, 16000, "wav"))
