"""One typed configuration root: TOML file + ``EDGEVOICE_`` environment overrides.

Precedence, highest first: environment (``EDGEVOICE_HTTP__PORT=9000``), the
TOML file, built-in defaults. Unknown keys are errors everywhere; each engine
validates its own ``options`` table with its options model before anything
starts (:func:`validate_engines`).
"""

from __future__ import annotations

import contextvars
import os
import re
import socket
import tomllib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from edgevoice.engines.base import EngineKind

ENV_PREFIX = "EDGEVOICE_"
SYSTEM_CONFIG = Path("/etc/edgevoice/config.toml")
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"


class ConfigError(ValueError):
    """The configuration is invalid; the message names the offending key(s)."""


def _xdg_dir(systemd_var: str, xdg_var: str, fallback: str) -> Path:
    # systemd's CacheDirectory=/StateDirectory= export these; prefer them.
    if value := os.environ.get(systemd_var):
        return Path(value.split(":")[0])
    base = os.environ.get(xdg_var)
    return (Path(base) if base else Path.home() / fallback) / "edgevoice"


def default_cache_dir() -> Path:
    return _xdg_dir("CACHE_DIRECTORY", "XDG_CACHE_HOME", ".cache")


def default_state_dir() -> Path:
    return _xdg_dir("STATE_DIRECTORY", "XDG_DATA_HOME", ".local/share")


def default_node_id() -> str:
    """The hostname, reduced to what is safe in an MQTT topic and an HA id."""
    node = re.sub(r"[^a-z0-9_-]+", "_", socket.gethostname().lower()).strip("_")
    return node or "edgevoice"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelConfig(_Strict):
    """One named model entry: ``[[asr]]``, ``[[tts]]``, ``[[wake]]`` or ``[[vad]]``."""

    name: str = Field(pattern=NAME_PATTERN)
    """Public name clients use (Wyoming program/voice name, OpenAI ``model``)."""
    engine: str
    """Engine plugin name, e.g. ``faster-whisper``, ``piper``."""
    model: str
    """Local path, short name (``tiny.en``), ``org/repo`` id or packaged model."""
    device: str | None = None
    """Overrides the global ``device`` for this model."""
    default: bool = False
    """The model used when a request names none (first entry otherwise)."""
    max_concurrency: int = Field(default=1, ge=1, le=64)
    """Requests this model serves at once; further ones queue."""
    aliases: list[str] = Field(default_factory=list)
    """Extra public names (e.g. ``whisper-1``, ``tts-1``)."""
    options: dict[str, Any] = Field(default_factory=dict)
    """Engine-specific options, validated by the engine's options model."""
    load: Literal["startup", "on_demand"] = "startup"
    """``startup``: loaded before the daemon reports ready; ``on_demand``: on first use."""
    ttl_s: float = Field(default=0.0, ge=0)
    """Unload after this many seconds unused (0 = never); it loads again on demand."""
    load_timeout_s: float = Field(default=300.0, gt=0)
    """How long a request waits for this model to load on demand before it fails."""


class WyomingConfig(_Strict):
    enabled: bool = True
    uri: str = "tcp://0.0.0.0:10300"
    """``tcp://HOST:PORT``, ``unix:///path`` or ``stdio://``."""
    zeroconf: bool = True
    """Advertise ``_wyoming._tcp.local.`` so Home Assistant discovers us (tcp only)."""
    zeroconf_name: str | None = None
    """Service name; default ``edgevoice-<node_id>``."""
    end_of_speech_s: float = Field(default=0.1, gt=0, le=5)
    """Silence after speech (per the VAD) that starts speculative decoding."""
    endpointing: Literal["server", "client"] = "server"
    """``server``: the VAD ends the utterance (``finish_silence_s``) and the
    ``transcript`` goes out before ``audio-stop``; the info says
    ``requires_external_vad = false`` (Home Assistant then runs no silence timer
    of its own). ``client``: the client's ``audio-stop`` ends it. Needs a ``[[vad]]``
    model; without one it is ``client``."""
    finish_silence_s: float = Field(default=0.5, gt=0, le=10)
    """Server endpointing: silence after speech that ends the utterance."""
    complete_sentence_silence_s: float | None = Field(default=0.3, gt=0, le=10)
    """Server endpointing: silence enough to end the utterance when the
    speculative transcript already ends a sentence (``.``, ``!``, ``?``);
    unset: always ``finish_silence_s``."""
    min_speech_s: float = Field(default=0.1, ge=0, le=5)
    """Server endpointing: speech needed before it counts (shorter noises are ignored)."""
    max_utterance_s: float = Field(default=15.0, gt=0, le=600)
    """Server endpointing: speech running this long is ended there."""


class HttpConfig(_Strict):
    enabled: bool = True
    host: str = "0.0.0.0"
    port: int = Field(default=8000, ge=0, le=65535)
    api_key: SecretStr | None = None
    """When set, requests need ``Authorization: Bearer <api_key>``."""
    api_key_file: Path | None = None
    """Read the key from a file (systemd ``LoadCredential=``)."""
    cors_origins: list[str] = Field(default_factory=list)
    """Allowed CORS origins; empty disables CORS."""
    cosyvoice_port: int | None = Field(default=None, ge=0, le=65535)
    """Also serve the API on this port (CosyVoice's is 50000), so unchanged CosyVoice
    clients work; None: only ``port``."""
    speakers: dict[str, str] = Field(default_factory=dict)
    """Speaker names of compatible APIs (CosyVoice ``spk_id``, Fish ``reference_id``,
    the ``voice`` of ``/v1/audio/speech`` as Xinference's client sends it) → a configured
    voice name or a voice-library id/name, e.g. ``{"中文女" = "voice_anna"}``."""


class MqttConfig(_Strict):
    enabled: bool = False
    url: str = "mqtt://localhost:1883"
    """``mqtt://host:port`` or ``mqtts://host:port``."""
    username: str | None = None
    password: SecretStr | None = None
    password_file: Path | None = None
    """Read the password from a file (systemd ``LoadCredential=``)."""
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    tls_insecure: bool = False
    node_id: str = Field(default_factory=default_node_id, pattern=r"^[a-z0-9_-]+$")
    topic_prefix: str = "edgevoice"
    discovery_prefix: str = "homeassistant"
    discovery: bool = True
    hermes: bool = False
    hermes_site_id: str = "default"
    pool: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_-]+$")
    """Join a node pool: requests on shared subscriptions are spread over its nodes."""
    keepalive_s: int = Field(default=60, ge=5)
    reconnect_min_s: float = Field(default=1.0, gt=0)
    reconnect_max_s: float = Field(default=30.0, gt=0)
    protocol: Literal["auto", "5", "3.1.1"] = "auto"
    """``auto`` tries MQTT 5 and falls back to 3.1.1 when the broker refuses it."""


class LimitsConfig(_Strict):
    """``[limits]``: one policy every face applies, each in its own error shape.

    Every bound is checked before the work it guards (declared duration before
    decoding, text length before phonemizing), so a hostile request costs
    little and the daemon keeps serving everyone else.
    """

    max_audio_s: float = Field(default=300.0, gt=0)
    """Longest audio in one transcription (HTTP upload, Wyoming stream, MQTT, Hermes);
    decoding stops as soon as it is crossed."""
    max_upload_bytes: int = Field(default=25 * 1024 * 1024, ge=1024)
    """Largest HTTP request body / MQTT audio payload."""
    max_input_chars: int = Field(default=4096, ge=1)
    """Longest text in one synthesis request (HTTP, Wyoming, MQTT), and the most text
    a streaming synthesis may hold unspoken."""
    max_sentence_chars: int = Field(default=300, ge=20, le=10000)
    """Longer sentences are cut at clause, then word boundaries before synthesis."""
    max_ws_message_bytes: int = Field(default=1024 * 1024, ge=1024)
    """Largest WebSocket message."""
    max_pending_per_client: int = Field(default=8, ge=1, le=1024)
    """Requests one client (connection, MQTT client id) may have queued or running."""
    max_connections: int = Field(default=256, ge=1)
    """Open connections per face (Wyoming, HTTP WebSockets); more are refused."""
    idle_timeout_s: float = Field(default=300.0, gt=0)
    """A connection that sends nothing for this long is closed (Wyoming; HTTP keep-alive)."""
    header_timeout_s: float = Field(default=10.0, gt=0)
    """Time a client has to send an HTTP request's headers (slowloris)."""
    session_timeout_s: float = Field(default=60.0, gt=0)
    """Streaming sessions (Hermes listening, speech streams) with no traffic expire."""
    max_voices: int = Field(default=100, ge=0)
    """Voices the voice library holds."""
    max_voice_library_bytes: int = Field(default=200 * 1024 * 1024, ge=0)
    """Bytes the voice library's reference clips may take together."""
    max_mqtt_outbox_bytes: int = Field(default=16 * 1024 * 1024, ge=1024)
    """Bytes of MQTT messages held while the broker is unreachable (oldest dropped)."""
    max_stream_sessions: int = Field(default=32, ge=1)
    """Text-streaming sessions of the compatible APIs (CSM) open at once; idle ones
    expire after ``session_timeout_s``."""
    max_stored_audio_files: int = Field(default=64, ge=1)
    """Generated files kept for download (CSM ``/v1/audio/{filename}``); oldest dropped."""
    max_stored_audio_bytes: int = Field(default=64 * 1024 * 1024, ge=1024)
    """Bytes of generated files kept for download; oldest dropped."""
    stored_audio_ttl_s: float = Field(default=600.0, gt=0)
    """A generated file can be downloaded for this long."""


class AudioIoMqttConfig(_Strict):
    """``[audio_io.mqtt]``: voice-loop events on the ``[mqtt]`` broker."""

    enabled: bool = True
    """Publish ``<base>/wake/detected``, ``<base>/asr/transcript`` and ``<base>/state``
    through the MQTT bridge (when ``[mqtt]`` is enabled)."""


class AudioIoWebhookConfig(_Strict):
    """``[audio_io.webhook]``: POST each transcript as JSON."""

    url: str | None = Field(default=None, pattern=r"^https?://")
    """``http(s)://...``; unset: no webhook."""
    headers: dict[str, str] = Field(default_factory=dict)
    """Extra request headers (e.g. an ``Authorization`` header)."""
    timeout_s: float = Field(default=10.0, gt=0, le=300)
    speak_response: bool = False
    """Speak the response: a ``text/plain`` body, or ``{"speech": "..."}`` in JSON."""


class AudioIoCommandConfig(_Strict):
    """``[audio_io.command]``: run a program with the transcript on stdin."""

    argv: list[str] = Field(default_factory=list)
    """Program and arguments (no shell); empty: no command."""
    timeout_s: float = Field(default=10.0, gt=0, le=300)
    speak_output: bool = False
    """Speak what the program writes to stdout."""


class AudioIoConversationConfig(_Strict):
    """``[audio_io.conversation]``: Home Assistant's conversation API."""

    url: str | None = Field(default=None, pattern=r"^https?://")
    """Home Assistant's base URL, e.g. ``http://homeassistant.local:8123``; unset: off."""
    token: SecretStr | None = None
    """A long-lived access token."""
    token_file: Path | None = None
    """Read the token from a file (systemd ``LoadCredential=``)."""
    agent_id: str | None = None
    """Conversation agent; unset: Home Assistant's default."""
    language: str | None = None
    timeout_s: float = Field(default=15.0, gt=0, le=300)
    speak_reply: bool = True
    """Speak Home Assistant's reply on the local speaker."""
    follow_up: bool = True
    """Listen again without a wake word when Home Assistant says the conversation goes on."""


class AudioIoConfig(_Strict):
    """``[audio_io]``: the local microphone/speaker voice loop (off by default)."""

    enabled: bool = False
    mode: Literal["standalone", "esphome"] = "standalone"
    """``standalone``: wake word → command → actions here; ``esphome``: a Home
    Assistant Assist satellite over the ESPHome native API."""
    input: str = "default"
    """Microphone: a PortAudio device name (substring), index or ``default``, or
    ``file:PATH`` (a WAV file played as the microphone at real-time pace, then silence)."""
    output: str = "default"
    """Speaker: a PortAudio device name, index or ``default``, or ``file:PATH`` (a WAV
    file the speaker appends to)."""
    required: bool = False
    """``true``: the daemon fails to start when the sound devices cannot be opened;
    ``false``: it logs, serves the other faces and retries with backoff."""
    block_ms: int = Field(default=64, ge=10, le=500)
    """Capture block length (16 kHz mono)."""
    input_queue_s: float = Field(default=2.0, gt=0, le=60)
    """Captured audio held for the loop; more is dropped and counted (overflow)."""
    file_pace: float = Field(default=1.0, gt=0, le=1000)
    """``file:`` devices run at this multiple of real time (tests: e.g. 4.0)."""
    retry_min_s: float = Field(default=1.0, gt=0)
    retry_max_s: float = Field(default=60.0, gt=0)
    """Backoff between attempts to open missing or failed sound devices."""
    wake_words: list[str] = Field(default_factory=list)
    """``[[wake]]`` names to listen for; empty: all. (Thresholds are each wake
    entry's engine options, e.g. microWakeWord ``probability_cutoff``.)"""
    wake_refractory_s: float = Field(default=2.0, ge=0)
    """After a wake word, further detections this soon are ignored."""
    asr_model: str | None = None
    vad_model: str | None = None
    voice: str | None = None
    """Voice of spoken replies; unset: the default voice."""
    language: str | None = None
    """Language of commands (ISO 639-1); unset: detected."""
    speech_threshold: float = Field(default=0.5, gt=0, lt=1)
    end_of_speech_s: float = Field(default=0.1, gt=0, le=5)
    """Silence after speech that starts the (speculative) decode."""
    finish_silence_s: float = Field(default=0.7, gt=0, le=10)
    """Silence after speech that ends the command."""
    complete_sentence_silence_s: float | None = Field(default=0.3, gt=0, le=10)
    """Silence enough to end the command when the speculative transcript
    already ends a sentence (``.``, ``!``, ``?``); unset: always ``finish_silence_s``."""
    min_speech_s: float = Field(default=0.1, ge=0, le=5)
    max_utterance_s: float = Field(default=15.0, gt=0, le=300)
    no_speech_timeout_s: float = Field(default=5.0, gt=0, le=300)
    """Back to waiting for the wake word when no speech follows it this long."""
    echo_guard_s: float = Field(default=0.3, ge=0, le=10)
    """Wake detection stays paused this long after edgevoice stopped speaking."""
    awake_sound: str = "chime"
    """Played on wake: ``chime`` (built in), a path to an audio file, or ``""``."""
    done_sound: str = ""
    """Played after a command was handled: ``done`` (built in), a path, or ``""``."""
    timer_sound: str = "alarm"
    """ESPHome mode: played when a timer finishes: ``alarm`` (built in), a path, or ``""``."""
    timer_ring_s: float = Field(default=15.0, gt=0, le=600)
    """A finished timer rings at most this long (a wake word stops it)."""
    volume: float = Field(default=1.0, ge=0, le=1)
    max_queued_playback: int = Field(default=16, ge=1, le=1024)
    """Sounds and speech waiting for the speaker; more are refused as busy."""
    mqtt: AudioIoMqttConfig = Field(default_factory=AudioIoMqttConfig)
    webhook: AudioIoWebhookConfig = Field(default_factory=AudioIoWebhookConfig)
    command: AudioIoCommandConfig = Field(default_factory=AudioIoCommandConfig)
    conversation: AudioIoConversationConfig = Field(default_factory=AudioIoConversationConfig)
    esphome_host: str = "0.0.0.0"
    esphome_port: int = Field(default=6053, ge=0, le=65535)
    """ESPHome native API port (6053 is ESPHome's own)."""
    esphome_name: str | None = Field(default=None, pattern=r"^[a-z0-9-]{1,31}$")
    """Device name Home Assistant sees; default ``edgevoice-<node_id>``."""
    esphome_friendly_name: str | None = None
    esphome_mac: str | None = Field(default=None, pattern=r"^([0-9A-Fa-f]{2}:){5}[0-9A-Fa-f]{2}$")
    """Unique id Home Assistant keys the device by; default: derived from the host."""
    esphome_encryption_key: SecretStr | None = None
    """Base64 32-byte noise key (as in ESPHome's ``api: encryption: key``); unset: plaintext."""
    zeroconf: bool = True
    """ESPHome mode: advertise ``_esphomelib._tcp.local.`` so Home Assistant discovers us."""

    @model_validator(mode="after")
    def _check_key(self) -> AudioIoConfig:
        key = self.esphome_encryption_key
        if key is not None:
            import binascii

            try:
                raw = binascii.a2b_base64(key.get_secret_value().strip())
            except binascii.Error:
                raw = b""
            if len(raw) != 32:
                raise ValueError("esphome_encryption_key must be 32 bytes, base64-encoded")
        return self


def _default_asr() -> list[ModelConfig]:
    return [
        ModelConfig(
            name="tiny-en",
            engine="faster-whisper",
            model="tiny.en",
            default=True,
            aliases=["whisper-1"],
            # Voice commands: a 10 s encoder window, ~3x less work than 30 s.
            options={"min_window_s": 10.0},
        )
    ]


def _default_tts() -> list[ModelConfig]:
    return [
        ModelConfig(
            name="joe",
            engine="piper",
            model="en_US-joe-medium",
            default=True,
            aliases=["tts-1", "tts-1-hd", "gpt-4o-mini-tts"],
        )
    ]


def _default_wake() -> list[ModelConfig]:
    return [
        ModelConfig(name=word, engine="microwakeword", model=word)
        for word in ("okay_nabu", "hey_jarvis", "alexa", "hey_mycroft")
    ]


def _default_vad() -> list[ModelConfig]:
    return [ModelConfig(name="silero", engine="silero-vad", model="silero", max_concurrency=4)]


_TOML_FILE: contextvars.ContextVar[Path | None] = contextvars.ContextVar(
    "edgevoice_toml_file", default=None
)


class Settings(BaseSettings):
    """The whole daemon configuration."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        extra="forbid",
        validate_default=True,
    )

    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    device: str = "auto"
    """``auto`` | ``cpu`` | ``cuda`` | ``cuda:N`` | ``mlx`` for every engine."""
    offline: bool = False
    """Forbid model downloads; only local and packaged models load."""
    cache_dir: Path = Field(default_factory=default_cache_dir)
    """Downloaded and assembled models."""
    state_dir: Path = Field(default_factory=default_state_dir)
    """Persistent state (voice library)."""
    shutdown_timeout_s: float = Field(default=10.0, ge=0)
    """How long in-flight requests may finish after SIGTERM."""
    release_memory_after_s: float = Field(default=5.0, ge=0, le=3600)
    """An engine that keeps memory while busy (Piper's onnxruntime arena, about
    1 MB a phoneme of its longest recent sentence) hands it back once it has
    had no request for this long."""

    asr: list[ModelConfig] = Field(default_factory=_default_asr)
    tts: list[ModelConfig] = Field(default_factory=_default_tts)
    wake: list[ModelConfig] = Field(default_factory=_default_wake)
    vad: list[ModelConfig] = Field(default_factory=_default_vad)

    wyoming: WyomingConfig = Field(default_factory=WyomingConfig)
    http: HttpConfig = Field(default_factory=HttpConfig)
    mqtt: MqttConfig = Field(default_factory=MqttConfig)
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    audio_io: AudioIoConfig = Field(default_factory=AudioIoConfig)

    @model_validator(mode="after")
    def _check_models(self) -> Settings:
        for kind in EngineKind:
            entries: list[ModelConfig] = getattr(self, kind.value)
            seen: set[str] = set()
            for i, entry in enumerate(entries):
                for public in (entry.name, *entry.aliases):
                    if public in seen:
                        raise ValueError(f"{kind.value}[{i}]: duplicate name {public!r}")
                    seen.add(public)
            if sum(e.default for e in entries) > 1:
                raise ValueError(f"{kind.value}: more than one entry has default = true")
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        toml_file = _TOML_FILE.get()
        if toml_file is not None:
            # Naming toml_file in model_config alone is silently ignored: the
            # source has to be in this list.
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=toml_file))
        return tuple(sources)

    def models(self, kind: EngineKind) -> list[ModelConfig]:
        entries: list[ModelConfig] = getattr(self, kind.value)
        return entries

    def device_for(self, entry: ModelConfig) -> str:
        return entry.device or self.device


@contextmanager
def _toml_source(path: Path | None) -> Iterator[None]:
    token = _TOML_FILE.set(path)
    try:
        yield
    finally:
        _TOML_FILE.reset(token)


def find_config_file(explicit: Path | None = None) -> Path | None:
    """The config file to read, or ``None`` for built-in defaults.

    An explicitly named file (argument or ``$EDGEVOICE_CONFIG``) must exist.
    """
    if explicit is None and (env := os.environ.get("EDGEVOICE_CONFIG")):
        explicit = Path(env)
    if explicit is not None:
        if not explicit.is_file():
            raise ConfigError(f"config file not found: {explicit}")
        return explicit
    for candidate in (SYSTEM_CONFIG, Path.home() / ".config" / "edgevoice" / "config.toml"):
        if candidate.is_file():
            return candidate
    return None


def _format_validation_error(exc: ValidationError, source: Path | None) -> str:
    where = f" in {source}" if source else ""
    lines = [f"invalid configuration{where}:"]
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "(root)"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        lines.append(f"  {key}: {msg}")
    return "\n".join(lines)


def load_config(path: Path | None = None, **overrides: Any) -> Settings:
    """Read the configuration (see :func:`find_config_file`) and validate it.

    Raises :class:`ConfigError` naming the offending key.
    """
    toml_file = find_config_file(path)
    if toml_file is not None:
        try:
            tomllib.loads(toml_file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read config file {toml_file}: {exc}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{toml_file}: not valid TOML: {exc}") from exc
    try:
        with _toml_source(toml_file):
            settings = Settings(**overrides)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc, toml_file)) from None
    settings._source = toml_file  # type: ignore[attr-defined]
    return settings


def config_source(settings: Settings) -> Path | None:
    source: Path | None = getattr(settings, "_source", None)
    return source


def _redact(value: Any) -> Any:
    if isinstance(value, SecretStr):
        return "**********" if value.get_secret_value() else ""
    if isinstance(value, dict):
        return {k: _redact(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_redact(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def _drop_none(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _drop_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_none(v) for v in value]
    return value


def effective_config_toml(settings: Settings) -> str:
    """The effective configuration as TOML, secrets redacted."""
    data = _drop_none(_redact(settings.model_dump(mode="python")))
    return _dump_toml(data)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
        return f'"{escaped}"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        if not value:
            return "{}"
        return (
            "{ " + ", ".join(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items()) + " }"
        )
    return _toml_value(str(value))


def _toml_key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else _toml_value(key)


def _dump_toml(data: dict[str, Any]) -> str:
    out: list[str] = []
    tables: list[tuple[str, dict[str, Any]]] = []
    arrays: list[tuple[str, list[dict[str, Any]]]] = []
    for key, value in data.items():
        if isinstance(value, dict):
            tables.append((key, value))
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            arrays.append((key, value))
        else:
            out.append(f"{_toml_key(key)} = {_toml_value(value)}")
    for key, items in arrays:
        for item in items:
            out.append(f"\n[[{key}]]")
            out.extend(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in item.items())
    for key, table in tables:
        out.append(f"\n[{key}]")
        out.extend(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in table.items())
    return "\n".join(out) + "\n"
