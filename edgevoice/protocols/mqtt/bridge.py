"""MQTT bridge: speak, transcribe and voice-loop events over a broker.

Topics (``<base>`` = ``<topic_prefix>/<node_id>``):

- ``<base>/status``: ``online``/``offline``, retained; ``offline`` is also the
  Last Will, so a killed daemon goes offline too.
- ``<base>/tts/say`` (JSON or plain text) → ``<base>/tts/audio/<id>`` (one
  binary audio message) → ``<base>/tts/done``.
- ``<base>/asr/transcribe`` (binary audio, or JSON with ``audio_b64``) → the
  MQTT 5 response topic (correlation data copied) or ``<base>/asr/transcript``.
- ``<base>/wake/detected``, ``<base>/asr/transcript``, ``<base>/state``: events
  the local voice loop publishes through :meth:`MqttBridge.publish_wake` etc.
- ``<base>/voice/set`` → ``<base>/voice`` (retained): the default voice.
- ``<base>/error``: every rejected request, ``{"error", "topic", "id"?}``.
- With ``pool``: ``$share/<pool>/<topic_prefix>/pool/<pool>/{tts/say,asr/transcribe}``.
- Home Assistant discovery (:mod:`mqtt_discovery`) and Hermes (:mod:`mqtt_hermes`).

The bridge owns one connection task that reconnects with exponential backoff.
Replies produced while the broker is away wait in an outbox and are published,
in order, right after the next connect (or reported when they expire).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import logging
import math
import os
import ssl
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import unquote, urlsplit

import aiomqtt
from aiomqtt.exceptions import MqttConnectError
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from edgevoice.audio import OUTPUT_FORMATS, AudioError, decode, encode
from edgevoice.config import MqttConfig, Settings
from edgevoice.engines.base import (
    EngineKind,
    EngineRequestError,
    SynthesizeOptions,
    TranscribeOptions,
)
from edgevoice.errors import UnknownModelError
from edgevoice.hub import EngineHub
from edgevoice.protocols.base import ProtocolServer
from edgevoice.protocols.mqtt_discovery import discovery_config, discovery_topic

_LOGGER = logging.getLogger(__name__)

VoiceState = Literal["idle", "listening", "processing", "speaking"]
VOICE_STATES: tuple[str, ...] = ("idle", "listening", "processing", "speaking")
# Requests handled at once (decode/encode/engine work); more wait their turn.
MAX_CONCURRENT_REQUESTS = 8
# Messages kept for publishing after a reconnect; the oldest go first when full.
OUTBOX_LIMIT = 1000
PUBLISH_TIMEOUT_S = 10.0
REQUEST_ID_PATTERN = r"^[A-Za-z0-9._:-]{1,64}$"
# CONNACK codes meaning "I don't speak this protocol version" (3.1.1 and 5).
_UNSUPPORTED_PROTOCOL_CODES = {1, 0x84}


class MqttRequestError(ValueError):
    """A request payload the bridge rejects; the message goes to ``<base>/error``."""


class _PartialRequestError(MqttRequestError):
    """A rejected request whose id could still be read (for the error report)."""

    def __init__(self, message: str, request_id: str | None) -> None:
        super().__init__(message)
        self.request_id = request_id


class RequestExpiredError(MqttRequestError):
    """The request's MQTT 5 message expiry passed before its reply was ready."""


@dataclass(frozen=True, slots=True)
class BrokerAddress:
    host: str
    port: int
    tls: bool
    username: str | None = None
    password: str | None = None

    @property
    def url(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"


def parse_broker_url(url: str) -> BrokerAddress:
    """``mqtt://[user[:password]@]host[:port]`` or ``mqtts://...`` (default ports 1883/8883)."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in ("mqtt", "mqtts", "tcp", "ssl"):
        raise ValueError(f"mqtt.url: unsupported scheme {parts.scheme!r}; use mqtt:// or mqtts://")
    tls = scheme in ("mqtts", "ssl")
    if not parts.hostname:
        raise ValueError(f"mqtt.url: no host in {url!r}")
    try:
        port = parts.port or (8883 if tls else 1883)
    except ValueError as exc:
        raise ValueError(f"mqtt.url: {exc}") from None
    return BrokerAddress(
        parts.hostname,
        port,
        tls,
        unquote(parts.username) if parts.username else None,
        unquote(parts.password) if parts.password else None,
    )


def read_password(config: MqttConfig) -> str | None:
    """Blocking: the password from the config or ``password_file``.

    A relative ``password_file`` is looked up in ``$CREDENTIALS_DIRECTORY``
    (systemd ``LoadCredential=``) when that is set.
    """
    if config.password is not None:
        return config.password.get_secret_value()
    if config.password_file is None:
        return None
    path = config.password_file
    creds = os.environ.get("CREDENTIALS_DIRECTORY")
    if not path.is_absolute() and creds:
        path = Path(creds) / path
    return path.read_text(encoding="utf-8").strip()


# ------------------------------------------------------------------ requests


def _error_text(exc: ValidationError) -> str:
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err["loc"])
    return f"{where}: {err['msg']}" if where else str(err["msg"])


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")

    id: str | None = Field(default=None, pattern=REQUEST_ID_PATTERN)

    @field_validator("id", mode="before")
    @classmethod
    def _id_to_str(cls, value: Any) -> Any:
        return str(value) if isinstance(value, int) and not isinstance(value, bool) else value


class SayRequest(_Request):
    text: str = Field(min_length=1)
    voice: str | None = None
    speed: float = Field(default=1.0, ge=0.25, le=4.0)
    format: Literal["wav", "flac", "mp3", "opus", "aac", "pcm"] = "wav"
    play: bool = False


class TranscribeRequest(_Request):
    audio_b64: str = Field(min_length=1)
    language: str | None = None
    model: str | None = None
    task: Literal["transcribe", "translate"] = "transcribe"
    prompt: str | None = None


def _json_object(payload: bytes) -> dict[str, Any]:
    try:
        data = json.loads(payload)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MqttRequestError(f"payload is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise MqttRequestError("JSON payload must be an object")
    return data


def _request_id(data: dict[str, Any]) -> str | None:
    """The id of a (maybe invalid) request, for error reports."""
    value = data.get("id")
    return str(value) if isinstance(value, str | int) and not isinstance(value, bool) else None


def parse_say(payload: bytes) -> SayRequest:
    """A speak request: a JSON object, or plain text meaning ``{"text": payload}``."""
    stripped = payload.strip()
    if stripped[:1] == b"{":
        data = _json_object(stripped)
        try:
            return SayRequest.model_validate(data)
        except ValidationError as exc:
            raise MqttRequestError(_error_text(exc)) from None
    try:
        text = stripped.decode("utf-8")
    except UnicodeDecodeError:
        raise MqttRequestError("speak payload is neither JSON nor UTF-8 text") from None
    if not text:
        raise MqttRequestError("text: empty speak request")
    return SayRequest(text=text)


def _parse_say_with_id(payload: bytes) -> tuple[str | None, SayRequest]:
    """Blocking for large payloads: the request; a parse error carries the id it saw."""
    request_id = None
    if payload.strip()[:1] == b"{":
        with contextlib.suppress(ValueError):
            data = json.loads(payload)
            request_id = _request_id(data) if isinstance(data, dict) else None
    try:
        return request_id, parse_say(payload)
    except _PartialRequestError:
        raise
    except MqttRequestError as exc:
        raise _PartialRequestError(str(exc), request_id) from None


def _new_id() -> str:
    return uuid.uuid4().hex[:12]


# ------------------------------------------------------------------- outbox


@dataclass(slots=True)
class OutgoingMessage:
    """One publish, kept until the broker has it (or it expires)."""

    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = False
    correlation: bytes | None = None
    deadline: float | None = None
    """``time.monotonic()`` after which the message is stale (MQTT 5 expiry)."""
    what: str = ""
    """For logs and error reports: what this message answers."""
    topic_for_error: str = ""
    request_id: str | None = None

    def remaining_s(self) -> float | None:
        return None if self.deadline is None else self.deadline - time.monotonic()


@dataclass(slots=True)
class RequestContext:
    """Where a request came from and where its answers go."""

    topic: str
    response_topic: str | None = None
    correlation: bytes | None = None
    deadline: float | None = None
    qos: int = 1
    user: dict[str, str] = field(default_factory=dict)
    received: float = field(default_factory=time.monotonic)

    @classmethod
    def from_message(cls, message: aiomqtt.Message) -> RequestContext:
        props = message.properties
        ctx = cls(topic=str(message.topic), qos=1)
        if props is not None:
            ctx.response_topic = getattr(props, "ResponseTopic", None) or None
            correlation = getattr(props, "CorrelationData", None)
            ctx.correlation = bytes(correlation) if correlation is not None else None
            expiry = getattr(props, "MessageExpiryInterval", None)
            if expiry is not None:
                ctx.deadline = ctx.received + float(expiry)
            for key, value in getattr(props, "UserProperty", None) or []:
                ctx.user[str(key)] = str(value)
        return ctx

    def check_expiry(self) -> None:
        if self.deadline is not None and time.monotonic() > self.deadline:
            raise RequestExpiredError(
                "request expired (MQTT message expiry) before its reply was ready"
            )


Handler = Callable[[aiomqtt.Message], None]


@dataclass(frozen=True, slots=True)
class Route:
    filter: str
    """Topic filter the message must match (no ``$share`` prefix)."""
    handler: Handler
    subscription: str = ""
    """What to subscribe to; defaults to ``filter``."""

    @property
    def subscribe_to(self) -> str:
        return self.subscription or self.filter


# ------------------------------------------------------------------- bridge


class MqttBridge(ProtocolServer):
    """Joins the broker as one device; see the module docstring for topics.

    Other parts of the daemon publish voice-loop events with
    :meth:`publish_wake`, :meth:`publish_transcript` and :meth:`publish_state`.
    """

    name = "mqtt"

    def __init__(self, settings: Settings, hub: EngineHub) -> None:
        self.settings = settings
        self.config = settings.mqtt
        self.hub = hub
        self.broker = parse_broker_url(self.config.url)
        self.node_id = self.config.node_id
        self.base = f"{self.config.topic_prefix}/{self.node_id}"
        self.status_topic = f"{self.base}/status"
        self.error_topic = f"{self.base}/error"
        self._use_v5 = self.config.protocol != "3.1.1"
        self._client: aiomqtt.Client | None = None
        self._online = asyncio.Event()
        self._lost = asyncio.Event()
        self._stop_requested = asyncio.Event()
        self._first_attempt = asyncio.Event()
        self._accepting = True
        self._outbox: deque[OutgoingMessage] = deque()
        self._tasks: set[asyncio.Task[None]] = set()
        self._runner: asyncio.Task[None] | None = None
        self._slots = asyncio.Semaphore(MAX_CONCURRENT_REQUESTS)
        self._password: str | None = None
        self._voice: str | None = None
        self._state: VoiceState = "idle"
        self.connections = 0
        """Successful connects so far (each one republishes ``online``)."""
        self.protocol_version: Literal["5", "3.1.1"] | None = None
        """The protocol of the current/last connection."""
        self._routes = self._build_routes()
        self.hermes: Any = None
        if self.config.hermes:
            from edgevoice.protocols.mqtt_hermes import HermesAdapter

            self.hermes = HermesAdapter(self)
            self._routes.extend(self.hermes.routes())

    # ------------------------------------------------------------ lifecycle

    @property
    def addresses(self) -> list[str]:
        return [f"{self.broker.url}/{self.base}"]

    @property
    def connected(self) -> bool:
        return self._online.is_set()

    @property
    def in_flight(self) -> int:
        """Requests being handled now."""
        return len(self._tasks)

    @property
    def outbox_size(self) -> int:
        return len(self._outbox)

    async def wait_online(self, timeout_s: float | None = None) -> None:
        await asyncio.wait_for(self._online.wait(), timeout_s)

    async def start(self) -> None:
        """Start the connection task; return after the first connect attempt.

        A broker that is not reachable yet is not fatal: the bridge keeps
        retrying with backoff (a well-behaved appliance survives broker
        reboots, including its own boot order).
        """
        self._password = await asyncio.to_thread(read_password, self.config)
        if self._password is None:
            self._password = self.broker.password
        self._runner = asyncio.create_task(self._run(), name="mqtt-connection")
        await self._first_attempt.wait()
        if not self._online.is_set():
            _LOGGER.warning(
                "MQTT broker %s not reachable yet; retrying in the background", self.broker.url
            )

    async def stop(self, timeout_s: float) -> None:
        """Stop taking requests, finish in-flight ones, publish ``offline``, disconnect."""
        if self._runner is None:
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        self._accepting = False
        client = self._client
        if client is not None and self._online.is_set():
            # Pool nodes: let the broker route new requests to the others.
            with contextlib.suppress(aiomqtt.MqttError, asyncio.TimeoutError):
                await asyncio.wait_for(
                    client.unsubscribe([r.subscribe_to for r in self._request_routes()]), 2.0
                )
        if self._tasks:
            _, pending = await asyncio.wait(
                set(self._tasks), timeout=max(0.0, deadline - loop.time())
            )
            for task in pending:
                task.cancel()
            if pending:
                _LOGGER.warning(
                    "Cancelled %d MQTT request(s) still running at shutdown", len(pending)
                )
                await asyncio.wait(pending)
        self._stop_requested.set()
        try:
            await asyncio.wait_for(self._runner, max(2.0, deadline - loop.time()))
        except (TimeoutError, asyncio.CancelledError):
            pass
        except Exception:
            _LOGGER.exception("MQTT connection task failed")
        if self._outbox:
            _LOGGER.error(
                "%d MQTT message(s) could not be published before shutdown: %s",
                len(self._outbox),
                ", ".join(m.what or m.topic for m in self._outbox),
            )
        self._runner = None

    # ----------------------------------------------------------- connection

    def _make_client(self) -> aiomqtt.Client:
        tls_params = None
        if self.broker.tls:
            tls_params = aiomqtt.TLSParameters(
                ca_certs=str(self.config.ca_file) if self.config.ca_file else None,
                certfile=str(self.config.cert_file) if self.config.cert_file else None,
                keyfile=str(self.config.key_file) if self.config.key_file else None,
                cert_reqs=ssl.CERT_NONE if self.config.tls_insecure else ssl.CERT_REQUIRED,
            )
        username = self.config.username or self.broker.username
        return aiomqtt.Client(
            self.broker.host,
            self.broker.port,
            username=username,
            password=self._password if username else None,
            identifier=f"edgevoice-{self.node_id}",
            protocol=aiomqtt.ProtocolVersion.V5 if self._use_v5 else aiomqtt.ProtocolVersion.V311,
            will=aiomqtt.Will(self.status_topic, "offline", qos=1, retain=True),
            keepalive=self.config.keepalive_s,
            timeout=PUBLISH_TIMEOUT_S,
            tls_params=tls_params,
            tls_insecure=self.config.tls_insecure if self.broker.tls else None,
        )

    async def _run(self) -> None:
        delay = self.config.reconnect_min_s
        while not self._stop_requested.is_set():
            client = self._make_client()
            try:
                async with client:
                    delay = self.config.reconnect_min_s
                    self._lost = asyncio.Event()
                    self._client = client
                    await self._on_connected(client)
                    self._first_attempt.set()
                    if await self._serve(client):
                        await self._goodbye(client)
                        return
            except MqttConnectError as exc:
                if (
                    self._use_v5
                    and self.config.protocol == "auto"
                    and _code(exc) in _UNSUPPORTED_PROTOCOL_CODES
                ):
                    _LOGGER.info("Broker refused MQTT 5; falling back to MQTT 3.1.1")
                    self._use_v5 = False
                    continue
                _LOGGER.warning("MQTT broker %s refused the connection: %s", self.broker.url, exc)
            except aiomqtt.MqttError as exc:
                _LOGGER.warning("MQTT connection to %s failed: %s", self.broker.url, exc)
            finally:
                self._online.clear()
                self._lost.set()
                self._client = None
                self._first_attempt.set()
            if self._stop_requested.is_set():
                return
            _LOGGER.info("Reconnecting to %s in %.1f s", self.broker.url, delay)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop_requested.wait(), delay)
            delay = min(delay * 2, self.config.reconnect_max_s)

    async def _on_connected(self, client: aiomqtt.Client) -> None:
        self.protocol_version = "5" if self._use_v5 else "3.1.1"
        subscriptions = [(route.subscribe_to, 1) for route in self._active_routes()]
        await client.subscribe(subscriptions)
        await self._send(client, OutgoingMessage(self.status_topic, b"online", retain=True))
        await self._send(client, self._state_message())
        await self._send(client, self._voice_message())
        if self.config.discovery:
            await self._send(client, self._discovery_message())
        await self._flush(client)
        self._online.set()
        self.connections += 1
        _LOGGER.info(
            "Connected to MQTT broker %s (MQTT %s) as %s",
            self.broker.url,
            self.protocol_version,
            self.base,
        )

    async def _serve(self, client: aiomqtt.Client) -> bool:
        """Dispatch messages until the connection drops (False) or stop (True)."""
        reader = asyncio.create_task(self._read(client), name="mqtt-reader")
        stopper = asyncio.create_task(self._stop_requested.wait(), name="mqtt-stop")
        try:
            done, _ = await asyncio.wait({reader, stopper}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopper.cancel()
            if not reader.done():
                reader.cancel()
            await asyncio.gather(reader, stopper, return_exceptions=True)
        if reader.done() and not reader.cancelled() and reader.exception() is not None:
            _LOGGER.warning("MQTT connection to %s lost: %s", self.broker.url, reader.exception())
            return False
        return stopper in done

    async def _read(self, client: aiomqtt.Client) -> None:
        async for message in client.messages:
            self._dispatch(message)

    async def _goodbye(self, client: aiomqtt.Client) -> None:
        try:
            await self._flush(client)
            await self._send(client, OutgoingMessage(self.status_topic, b"offline", retain=True))
        except aiomqtt.MqttError as exc:
            _LOGGER.warning("Could not publish offline status: %s", exc)
        self._online.clear()

    # ----------------------------------------------------------- publishing

    def _properties(self, message: OutgoingMessage) -> Properties | None:
        if not self._use_v5:
            return None
        props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        used = False
        if message.correlation is not None:
            props.CorrelationData = message.correlation
            used = True
        remaining = message.remaining_s()
        if remaining is not None:
            props.MessageExpiryInterval = max(1, math.ceil(remaining))
            used = True
        return props if used else None

    async def _send(self, client: aiomqtt.Client, message: OutgoingMessage) -> None:
        """Publish now; raises MqttError when the connection is (or goes) down."""
        lost = self._lost
        if lost.is_set():
            raise aiomqtt.MqttError("not connected")
        publish = asyncio.ensure_future(
            client.publish(
                message.topic,
                message.payload,
                qos=message.qos,
                retain=message.retain,
                properties=self._properties(message),
                timeout=PUBLISH_TIMEOUT_S,
            )
        )
        watch = asyncio.ensure_future(lost.wait())
        try:
            done, _ = await asyncio.wait({publish, watch}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watch.cancel()
        if publish in done:
            publish.result()
            return
        publish.cancel()
        with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError):
            await publish
        raise aiomqtt.MqttError("connection lost while publishing")

    async def _flush(self, client: aiomqtt.Client) -> None:
        while self._outbox:
            message = self._outbox[0]
            remaining = message.remaining_s()
            if remaining is not None and remaining <= 0:
                self._outbox.popleft()
                _LOGGER.warning("Dropped %s: it expired while the broker was away", message.what)
                if message.topic_for_error:
                    self._enqueue(
                        self._error_message(
                            f"{message.what or 'reply'} expired while the broker was unreachable",
                            message.topic_for_error,
                            message.request_id,
                        )
                    )
                continue
            await self._send(client, message)
            self._outbox.popleft()

    def _enqueue(self, message: OutgoingMessage) -> None:
        if len(self._outbox) >= OUTBOX_LIMIT:
            dropped = self._outbox.popleft()
            _LOGGER.error("MQTT outbox full; dropped %s", dropped.what or dropped.topic)
        self._outbox.append(message)

    async def publish(self, message: OutgoingMessage) -> None:
        """Publish, or keep the message for after the reconnect when the broker is away."""
        client = self._client
        if client is not None and self._online.is_set() and not self._outbox:
            try:
                await self._send(client, message)
                return
            except aiomqtt.MqttError as exc:
                _LOGGER.info(
                    "Publishing %s failed (%s); keeping it for the reconnect",
                    message.what or message.topic,
                    exc,
                )
        self._enqueue(message)
        _LOGGER.debug("Queued %s until the broker is back", message.what or message.topic)

    async def publish_json(self, topic: str, data: dict[str, Any], *, retain: bool = False) -> None:
        await self.publish(OutgoingMessage(topic, json.dumps(data).encode(), retain=retain))

    # --------------------------------------------------------------- events

    async def publish_wake(self, wake_word: str, **details: Any) -> None:
        """A wake word was detected locally → ``<base>/wake/detected`` (HA event)."""
        payload = {"event_type": "detected", "wake_word": wake_word, **details}
        await self.publish_json(f"{self.base}/wake/detected", payload)
        if self.hermes is not None:
            await self.hermes.publish_wake(wake_word)

    async def publish_transcript(
        self, text: str, *, language: str = "", duration_s: float = 0.0, id: str | None = None
    ) -> None:
        """A local utterance was transcribed → ``<base>/asr/transcript``."""
        payload = {
            "text": text,
            "language": language,
            "duration_s": round(duration_s, 3),
            "id": id or _new_id(),
            "node_id": self.node_id,
        }
        await self.publish_json(f"{self.base}/asr/transcript", payload)

    async def publish_state(self, state: VoiceState) -> None:
        """The local voice loop's state → ``<base>/state`` (retained)."""
        if state not in VOICE_STATES:
            raise ValueError(f"unknown voice state {state!r}; use one of {', '.join(VOICE_STATES)}")
        self._state = state
        await self.publish(self._state_message())

    def _state_message(self) -> OutgoingMessage:
        return OutgoingMessage(f"{self.base}/state", self._state.encode(), retain=True)

    def _voice_message(self) -> OutgoingMessage:
        return OutgoingMessage(f"{self.base}/voice", self._current_voice().encode(), retain=True)

    def _current_voice(self) -> str:
        if self._voice:
            return self._voice
        models = self.hub.models(EngineKind.TTS)
        default = next((m for m in models if m.default), models[0] if models else None)
        return default.name if default is not None else ""

    def voice_options(self) -> list[str]:
        """Voices offered in the HA select: model names, plus the voices of multi-voice models."""
        options: list[str] = []
        for model in self.hub.models(EngineKind.TTS):
            options.append(model.name)
            voices = model.engine.capabilities.voices
            if len(voices) > 1:
                options.extend(v.name for v in voices if v.name not in options)
        return options

    def _discovery_message(self) -> OutgoingMessage:
        config = discovery_config(node_id=self.node_id, base=self.base, voices=self.voice_options())
        return OutgoingMessage(
            discovery_topic(self.config.discovery_prefix, self.node_id),
            json.dumps(config).encode(),
            retain=True,
            what="discovery",
        )

    # -------------------------------------------------------------- routing

    def _build_routes(self) -> list[Route]:
        routes = [
            Route(f"{self.base}/tts/say", self._spawn_handler(self._handle_say)),
            Route(f"{self.base}/asr/transcribe", self._spawn_handler(self._handle_transcribe)),
            Route(f"{self.base}/voice/set", self._handle_voice_set),
        ]
        if self.config.pool:
            pool = self.config.pool
            pool_base = f"{self.config.topic_prefix}/pool/{pool}"
            routes += [
                Route(
                    f"{pool_base}/tts/say",
                    self._spawn_handler(self._handle_say),
                    f"$share/{pool}/{pool_base}/tts/say",
                ),
                Route(
                    f"{pool_base}/asr/transcribe",
                    self._spawn_handler(self._handle_transcribe),
                    f"$share/{pool}/{pool_base}/asr/transcribe",
                ),
            ]
        if self.config.discovery:
            routes.append(Route(f"{self.config.discovery_prefix}/status", self._handle_ha_status))
        return routes

    def _request_routes(self) -> list[Route]:
        return [r for r in self._routes if r.handler is not self._handle_ha_status]

    def _active_routes(self) -> list[Route]:
        return self._routes

    def _dispatch(self, message: aiomqtt.Message) -> None:
        for route in self._routes:
            if message.topic.matches(route.filter):
                if message.retain and route.handler is not self._handle_ha_status:
                    # A retained request would re-run on every reconnect.
                    self._report_soon(str(message.topic), "retained requests are ignored", None)
                    return
                try:
                    route.handler(message)
                except Exception:
                    _LOGGER.exception("Error handling MQTT message on %s", message.topic)
                return

    def _spawn_handler(
        self, handler: Callable[[aiomqtt.Message, RequestContext], Awaitable[None]]
    ) -> Handler:
        def start(message: aiomqtt.Message) -> None:
            ctx = RequestContext.from_message(message)
            if not self._accepting:
                self._report_soon(ctx.topic, "node is shutting down", None, ctx)
                return
            self.spawn(self._guarded(handler, message, ctx), name=f"mqtt {ctx.topic}")

        return start

    def spawn(self, coro: Awaitable[None], name: str) -> None:
        """Run a request coroutine as an owned task (awaited at stop)."""

        async def run() -> None:
            await coro

        task = asyncio.create_task(run(), name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _guarded(
        self,
        handler: Callable[[aiomqtt.Message, RequestContext], Awaitable[None]],
        message: aiomqtt.Message,
        ctx: RequestContext,
    ) -> None:
        async with self._slots:
            try:
                await handler(message, ctx)
            except asyncio.CancelledError:
                await asyncio.shield(
                    self.report_error(ctx.topic, "request cancelled at shutdown", None, ctx)
                )
                raise

    # --------------------------------------------------------------- errors

    def _error_message(self, error: str, topic: str, request_id: str | None) -> OutgoingMessage:
        data: dict[str, Any] = {"error": error, "topic": topic}
        if request_id is not None:
            data["id"] = request_id
        return OutgoingMessage(self.error_topic, json.dumps(data).encode(), what="error report")

    async def report_error(
        self,
        topic: str,
        error: str,
        request_id: str | None,
        ctx: RequestContext | None = None,
    ) -> None:
        """A rejected request → ``<base>/error`` (and the MQTT 5 response topic, if any)."""
        _LOGGER.info("MQTT request on %s rejected: %s", topic, error)
        await self.publish(self._error_message(error, topic, request_id))
        if ctx is not None and ctx.response_topic:
            reply: dict[str, Any] = {"error": error, "node_id": self.node_id}
            if request_id is not None:
                reply["id"] = request_id
            await self.publish(
                OutgoingMessage(
                    ctx.response_topic,
                    json.dumps(reply).encode(),
                    correlation=ctx.correlation,
                    what="error reply",
                )
            )

    def _report_soon(
        self, topic: str, error: str, request_id: str | None, ctx: RequestContext | None = None
    ) -> None:
        self.spawn(self.report_error(topic, error, request_id, ctx), name="mqtt error report")

    # ------------------------------------------------------------- handlers

    async def _handle_say(self, message: aiomqtt.Message, ctx: RequestContext) -> None:
        request_id: str | None = None
        try:
            payload = message.payload if isinstance(message.payload, bytes) else b""
            request_id, request = await asyncio.to_thread(_parse_say_with_id, payload)
            request_id = request.id or ctx.user.get("id")
            if len(request.text) > self.settings.limits.max_input_chars:
                raise MqttRequestError(
                    f"text is {len(request.text)} characters; the limit is "
                    f"{self.settings.limits.max_input_chars}"
                )
            await self.speak(request, request_id or _new_id(), ctx)
        except _PartialRequestError as exc:
            await self.report_error(ctx.topic, str(exc), exc.request_id, ctx)
        except (MqttRequestError, UnknownModelError, AudioError, EngineRequestError) as exc:
            await self.report_error(ctx.topic, str(exc), request_id, ctx)
        except Exception as exc:
            _LOGGER.exception("Speak request on %s failed", ctx.topic)
            await self.report_error(ctx.topic, f"internal error: {exc}", request_id, ctx)

    async def synthesize(
        self, text: str, voice: str | None, speed: float, fmt: str
    ) -> tuple[bytes, float]:
        """Synthesize and encode (in worker threads): (encoded audio, duration in s)."""
        audio = await self.hub.synthesize_all(
            text, SynthesizeOptions(voice=voice or self._voice or None, speed=speed)
        )
        encoded = await asyncio.to_thread(encode, audio.samples, audio.rate_hz, fmt)
        return encoded, audio.duration_s

    async def speak(self, request: SayRequest, request_id: str, ctx: RequestContext) -> None:
        self.hub.voice(request.voice or self._voice or None)  # unknown voice → error now
        encoded, duration_s = await self.synthesize(
            request.text, request.voice, request.speed, request.format
        )
        ctx.check_expiry()
        audio_topic = f"{self.base}/tts/audio/{request_id}"
        await self.publish(
            OutgoingMessage(
                audio_topic,
                encoded,
                deadline=ctx.deadline,
                what=f"audio of speak request {request_id}",
                topic_for_error=ctx.topic,
                request_id=request_id,
            )
        )
        done: dict[str, Any] = {
            "id": request_id,
            "duration_s": round(duration_s, 3),
            "format": request.format,
            "audio_topic": audio_topic,
            "node_id": self.node_id,
        }
        if request.play:
            # No local audio output exists yet: say so instead of pretending.
            done["played"] = False
            done["play_error"] = "no local speaker is configured"
        await self.publish(
            OutgoingMessage(
                f"{self.base}/tts/done",
                json.dumps(done).encode(),
                deadline=ctx.deadline,
                what=f"done of speak request {request_id}",
                topic_for_error=ctx.topic,
                request_id=request_id,
            )
        )

    async def _handle_transcribe(self, message: aiomqtt.Message, ctx: RequestContext) -> None:
        request_id: str | None = ctx.user.get("id")
        payload = message.payload if isinstance(message.payload, bytes) else b""
        try:
            request, audio_bytes = await asyncio.to_thread(_parse_transcribe, payload)
            if request is not None:
                request_id = request.id or request_id
            language = (request.language if request else None) or ctx.user.get("language")
            model = (request.model if request else None) or ctx.user.get("model")
            self.hub.asr(model)  # unknown model → error before decoding
            audio = await asyncio.to_thread(
                decode, audio_bytes, max_duration_s=self.settings.limits.max_audio_s
            )
            options = TranscribeOptions(
                language=language or None,
                task=request.task if request else "transcribe",
                prompt=request.prompt if request else None,
            )
            transcript = await self.hub.transcribe(audio, options, model=model)
            ctx.check_expiry()
            request_id = request_id or _new_id()
            reply = {
                "text": transcript.text,
                "language": transcript.language,
                "duration_s": round(transcript.duration_s, 3),
                "id": request_id,
                "node_id": self.node_id,
            }
            target = ctx.response_topic or f"{self.base}/asr/transcript"
            await self.publish(
                OutgoingMessage(
                    target,
                    json.dumps(reply).encode(),
                    correlation=ctx.correlation,
                    deadline=ctx.deadline,
                    what=f"transcript of request {request_id}",
                    topic_for_error=ctx.topic,
                    request_id=request_id,
                )
            )
        except _PartialRequestError as exc:
            await self.report_error(ctx.topic, str(exc), exc.request_id or request_id, ctx)
        except (MqttRequestError, UnknownModelError, AudioError, EngineRequestError) as exc:
            await self.report_error(ctx.topic, str(exc), request_id, ctx)
        except Exception as exc:
            _LOGGER.exception("Transcribe request on %s failed", ctx.topic)
            await self.report_error(ctx.topic, f"internal error: {exc}", request_id, ctx)

    def _handle_voice_set(self, message: aiomqtt.Message) -> None:
        topic = str(message.topic)
        payload = message.payload if isinstance(message.payload, bytes) else b""
        try:
            name = payload.decode("utf-8").strip()
        except UnicodeDecodeError:
            self._report_soon(topic, "voice name is not UTF-8 text", None)
            return
        try:
            self.hub.voice(name or None)
        except UnknownModelError as exc:
            self._report_soon(topic, str(exc), None)
            return
        self._voice = name or None
        _LOGGER.info("Default voice for MQTT speak requests: %s", self._current_voice())
        self.spawn(self.publish(self._voice_message()), name="mqtt voice state")

    def _handle_ha_status(self, message: aiomqtt.Message) -> None:
        if message.payload == b"online":
            _LOGGER.info("Home Assistant came online; republishing discovery")
            self.spawn(self.publish(self._discovery_message()), name="mqtt discovery")


def _parse_transcribe(payload: bytes) -> tuple[TranscribeRequest | None, bytes]:
    """Blocking (large payloads): the JSON form with ``audio_b64``, or raw audio bytes."""
    if not payload:
        raise MqttRequestError("empty transcribe request (0 bytes)")
    if payload.lstrip()[:1] != b"{":
        return None, payload
    data = _json_object(payload)
    request_id = _request_id(data)
    try:
        request = TranscribeRequest.model_validate(data)
    except ValidationError as exc:
        raise _PartialRequestError(_error_text(exc), request_id) from None
    try:
        audio = base64.b64decode(request.audio_b64, validate=True)
    except (binascii.Error, ValueError):
        raise _PartialRequestError("audio_b64 is not valid base64", request_id) from None
    return request, audio


def _code(exc: aiomqtt.MqttCodeError) -> int | None:
    rc = exc.rc
    if rc is None:
        return None
    if isinstance(rc, int):
        return rc
    return int(rc.value)


__all__ = [
    "OUTPUT_FORMATS",
    "MqttBridge",
    "MqttRequestError",
    "OutgoingMessage",
    "SayRequest",
    "parse_broker_url",
    "parse_say",
]
