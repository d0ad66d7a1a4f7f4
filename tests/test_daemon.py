"""The daemon under a (test) service manager: sd_notify, watchdog, SIGHUP reload, drain.

In-process tests drive :class:`Daemon` with real engines and a notify socket
the test listens on; the subprocess test runs ``python -m edgevoice serve`` the
way systemd does (``NOTIFY_SOCKET``, ``WATCHDOG_USEC``, ``JOURNAL_STREAM``) and
talks to whatever protocol servers the daemon has (Wyoming / HTTP).
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from edgevoice.audio import decode
from edgevoice.config import ConfigError, ModelConfig, Settings
from edgevoice.daemon import Daemon
from edgevoice.engines.base import EngineKind
from edgevoice.sdnotify import SystemdNotifier
from tests.conftest import LAMP_TEXT, LAMP_WAV, LIGHT_EN_TEXT, LIGHT_EN_WAV, TINY_EN

pytestmark = pytest.mark.slow


class NotifyListener:
    """The service manager's end of ``$NOTIFY_SOCKET``: collects messages."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.setblocking(False)
        self.messages: list[dict[str, str]] = []

    async def next(self, timeout_s: float = 60.0) -> dict[str, str]:
        loop = asyncio.get_running_loop()
        data = await asyncio.wait_for(loop.sock_recv(self.sock, 4096), timeout_s)
        message = dict(line.split("=", 1) for line in data.decode().splitlines())
        self.messages.append(message)
        return message

    async def until(self, key: str, timeout_s: float = 120.0) -> dict[str, str]:
        """The next message carrying ``key``; WATCHDOG pings in between are kept."""
        async with asyncio.timeout(timeout_s):
            while True:
                message = await self.next(timeout_s)
                if key in message:
                    return message

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[NotifyListener]:
    sock = NotifyListener(tmp_path / "notify.sock")
    yield sock
    sock.close()


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

        # Reload 3 and 4: a broken file and an unknown engine are rejected; the
        # running configuration stays.
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
        for _ in range(2):
            reloads = daemon.reloads
            daemon.request_reload()
            await listener.until("RELOADING")
            rejected = await listener.until("READY")
            assert rejected["STATUS"].endswith("(reload rejected: see log)")
            assert daemon.reloads == reloads + 1
        assert hub.asr().slot is new_slot
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
