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
- ``<base>/models`` (retained JSON, on each change): every model's lifecycle
  state ``{"models": [{"name", "kind", "state", "device", "memory_bytes", ...}]}``.
- ``<base>/error``: every rejected request, ``{"error", "code", "topic", "id"?,
  "param"?, "limit"?}`` (:func:`~edgevoice.protocols.mqtt.messages.error_fields`).
- With ``pool``: ``$share/<pool>/<topic_prefix>/pool/<pool>/{tts/say,asr/transcribe}``.
- Home Assistant discovery (:mod:`.discovery`) and Hermes (:mod:`.hermes`).

Bounds (``[limits]``): a payload is at most ``max_upload_bytes``; a request
waits in a bounded queue (``max_pending_per_client`` per client, see
:attr:`RequestContext.client_key`, and :data:`MAX_QUEUED_REQUESTS` in all)
and gets its task only when one of :data:`MAX_CONCURRENT_REQUESTS` turns is
free, round-robin over clients; more is refused with ``busy``. Each request
runs in ``client_scope("mqtt", client)``, so the hub's engine turns are shared
fairly with the other faces.

The bridge owns one connection task that reconnects with exponential backoff.
Replies produced while the broker is away wait in an outbox capped in bytes
(``max_mqtt_outbox_bytes``) and are published, in order, right after the next
connect (or reported when they expire).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import math
import os
import ssl
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar
from urllib.parse import unquote, urlsplit

import aiomqtt
import numpy as np
from aiomqtt.exceptions import MqttConnectError
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edgevoice.audio import OUTPUT_FORMATS, decode, encode
from edgevoice.config import MqttConfig, Settings
from edgevoice.engines.base import EngineKind, FloatAudio, SynthesizeOptions, TranscribeOptions
from edgevoice.errors import (
    BusyError,
    ClientError,
    EdgeVoiceError,
    PayloadTooLargeError,
    ShuttingDownError,
    UnknownModelError,
)
from edgevoice.fairness import client_scope
from edgevoice.hub import EngineHub
from edgevoice.pipeline.speak import input_limit_error, speak
from edgevoice.protocols.base import ProtocolServer
from edgevoice.protocols.mqtt.discovery import discovery_config, discovery_topic
from edgevoice.protocols.mqtt.hermes import HermesAdapter
from edgevoice.protocols.mqtt.messages import (
    Handler,
    MqttRequestError,
    RequestContext,
    Route,
    SayRequest,
    error_fields,
    new_id,
    parse_say,
    parse_transcribe,
    valid_id,
)
from edgevoice.protocols.mqtt.outbox import Outbox, OutgoingMessage

_LOGGER = logging.getLogger(__name__)

T = TypeVar("T")

VoiceState = Literal["idle", "listening", "thinking", "processing", "speaking"]
# "thinking" is what the local voice loop publishes; "processing" stays accepted.
VOICE_STATES: tuple[str, ...] = ("idle", "listening", "thinking", "processing", "speaking")
MAX_CONCURRENT_REQUESTS = 8
"""Requests handled at once (parse, decode, engine turns, encode); each has one task."""
MAX_QUEUED_REQUESTS = 256
"""Requests waiting for a turn, all clients together; more are refused as ``busy``."""
MAX_INCOMING_BACKLOG = 1024
"""Messages the MQTT client buffers before the reader takes them (it never waits on work)."""
PUBLISH_TIMEOUT_S = 10.0
# Payloads up to this size are parsed on the event loop; larger ones in a worker thread.
_INLINE_PARSE_BYTES = 64 * 1024
# CONNACK codes meaning "I don't speak this protocol version" (3.1.1 and 5).
_UNSUPPORTED_PROTOCOL_CODES = {1, 0x84}


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


@dataclass(slots=True)
class _Queued:
    """A request admitted but not started: no task exists for it yet."""

    client_key: str
    topic: str
    work: Callable[[], Awaitable[None]]
    size_bytes: int
    ctx: RequestContext | None


# ------------------------------------------------------------------- bridge


class MqttBridge(ProtocolServer):
    """Joins the broker as one device; see the module docstring for topics and bounds.

    Other parts of the daemon publish voice-loop events with
    :meth:`publish_wake`, :meth:`publish_transcript` and :meth:`publish_state`.
    Everything runs on the event loop; blocking work (parsing large payloads,
    decoding, encoding, engines) goes to worker threads.
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
        self.reserved_prefixes: list[str] = [
            self.config.topic_prefix,
            self.config.discovery_prefix,
        ]
        """Response topics under these are refused: the daemon's own topics, Home
        Assistant's discovery, Hermes (when on)."""
        self._use_v5 = self.config.protocol != "3.1.1"
        self._client: aiomqtt.Client | None = None
        self._online = asyncio.Event()
        self._lost = asyncio.Event()
        self._stop_requested = asyncio.Event()
        self._first_attempt = asyncio.Event()
        self._accepting = True
        self._outbox = Outbox(settings.limits.max_mqtt_outbox_bytes)
        # Admission: client key -> requests waiting (round robin), and queued + running.
        self._queue: OrderedDict[str, deque[_Queued]] = OrderedDict()
        self._queued = 0
        self._queued_bytes = 0
        self._pending: dict[str, int] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._background: set[asyncio.Task[None]] = set()
        self._forget_models: Callable[[], None] | None = None
        self._idle = asyncio.Event()
        self._idle.set()
        self._runner: asyncio.Task[None] | None = None
        self._password: str | None = None
        self._voice: str | None = None
        self._state: VoiceState = "idle"
        self.connections = 0
        """Successful connects so far (each one republishes ``online``)."""
        self.protocol_version: Literal["5", "3.1.1"] | None = None
        """The protocol of the current/last connection."""
        self._routes = self._build_routes()
        self.hermes: HermesAdapter | None = None
        if self.config.hermes:
            self.reserved_prefixes.append("hermes")
            self.hermes = HermesAdapter(self, self.config.hermes_site_id)
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
        """Requests being handled now (each has a task; at most MAX_CONCURRENT_REQUESTS)."""
        return len(self._tasks)

    @property
    def queued(self) -> int:
        """Requests admitted and waiting for a turn (no task yet)."""
        return self._queued

    @property
    def outbox_size(self) -> int:
        return len(self._outbox)

    @property
    def outbox_bytes(self) -> int:
        return self._outbox.size_bytes

    @property
    def outbox_dropped(self) -> int:
        """Messages dropped because the outbox was full (since start)."""
        return self._outbox.dropped

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
        self._forget_models = self.hub.add_state_listener(
            lambda: self.spawn(self.publish(self._models_message()), "mqtt-models")
        )
        await self._first_attempt.wait()
        if not self._online.is_set():
            _LOGGER.warning(
                "MQTT broker %s not reachable yet; retrying in the background", self.broker.url
            )

    async def stop(self, timeout_s: float) -> None:
        """Stop taking requests, finish admitted ones, publish ``offline``, disconnect."""
        if self._runner is None:
            return
        if self._forget_models is not None:
            self._forget_models()
            self._forget_models = None
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
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), max(0.0, deadline - loop.time()))
        if not self._idle.is_set():
            await self._abandon_requests()
        if self.hermes is not None:
            self.hermes.close()
        for task in self._background:
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
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
                self._outbox.describe(),
            )
        self._runner = None

    async def _abandon_requests(self) -> None:
        """At the stop timeout: refuse what is still queued, cancel what runs."""
        waiting = [item for items in self._queue.values() for item in items]
        self._queue.clear()
        self._queued = self._queued_bytes = 0
        for item in waiting:
            self._release(item.client_key)
        if waiting:
            _LOGGER.warning("Refused %d queued MQTT request(s) at shutdown", len(waiting))
        for item in waiting:
            await self.report_error(
                item.topic, ShuttingDownError("node is shutting down"), None, item.ctx
            )
        pending = set(self._tasks)
        if pending:
            _LOGGER.warning("Cancelled %d MQTT request(s) still running at shutdown", len(pending))
            for task in pending:
                task.cancel()
            await asyncio.wait(pending)

    async def hub_reloaded(self) -> None:
        """Models changed: republish the voice select's options and the current voice."""
        if self._voice is not None:
            try:
                self.hub.voice(self._voice)
            except UnknownModelError:
                _LOGGER.info("Voice %s is gone after the reload; using the default", self._voice)
                self._voice = None
        await self.publish(self._voice_message())
        if self.config.discovery:
            await self.publish(self._discovery_message())

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
            max_queued_incoming_messages=MAX_INCOMING_BACKLOG,
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
        await self._send(client, self._models_message())
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
            await self._dispatch(message)
            # Queued messages are handed over without yielding: a burst of them
            # must not hold the loop (the other faces, the engines' results).
            await asyncio.sleep(0)

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
            message = self._outbox.peek()
            remaining = message.remaining_s()
            if remaining is not None and remaining <= 0:
                self._outbox.popleft()
                _LOGGER.warning("Dropped %s: it expired while the broker was away", message.what)
                if message.topic_for_error:
                    self._outbox.append(
                        self._error_message(
                            {
                                "error": f"{message.what or 'reply'} expired while the broker "
                                "was unreachable",
                                "code": "expired",
                            },
                            message.topic_for_error,
                            message.request_id,
                        )
                    )
                continue
            await self._send(client, message)
            self._outbox.popleft()

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
                    message.describe(),
                    exc,
                )
        self._outbox.append(message)
        _LOGGER.debug("Queued %s until the broker is back", message.describe())

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
            "id": id or new_id(),
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

    def _models_message(self) -> OutgoingMessage:
        """Every model's lifecycle state → ``<base>/models`` (retained)."""
        states = [status.to_json() for status in self.hub.model_states()]
        payload = json.dumps({"node_id": self.node_id, "models": states}).encode()
        return OutgoingMessage(f"{self.base}/models", payload, retain=True)

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
            Route(f"{self.base}/tts/say", self._request_handler(self._handle_say)),
            Route(f"{self.base}/asr/transcribe", self._request_handler(self._handle_transcribe)),
            Route(f"{self.base}/voice/set", self._handle_voice_set),
        ]
        if self.config.pool:
            pool = self.config.pool
            pool_base = f"{self.config.topic_prefix}/pool/{pool}"
            routes += [
                Route(
                    f"{pool_base}/tts/say",
                    self._request_handler(self._handle_say),
                    f"$share/{pool}/{pool_base}/tts/say",
                ),
                Route(
                    f"{pool_base}/asr/transcribe",
                    self._request_handler(self._handle_transcribe),
                    f"$share/{pool}/{pool_base}/asr/transcribe",
                ),
            ]
        if self.config.discovery:
            routes.append(
                Route(
                    f"{self.config.discovery_prefix}/status", self._handle_ha_status, request=False
                )
            )
        return routes

    def _request_routes(self) -> list[Route]:
        return [r for r in self._routes if r.request]

    def _active_routes(self) -> list[Route]:
        return self._routes

    async def _dispatch(self, message: aiomqtt.Message) -> None:
        """Route one message (on the reader: quick; request work is queued, not awaited)."""
        for route in self._routes:
            if message.topic.matches(route.filter):
                if message.retain and route.request:
                    # A retained request would re-run on every reconnect.
                    await self.report_error(
                        str(message.topic), MqttRequestError("retained requests are ignored"), None
                    )
                    return
                try:
                    await route.handler(message)
                except Exception:
                    _LOGGER.exception("Error handling MQTT message on %s", message.topic)
                return

    def _request_handler(
        self, handler: Callable[[aiomqtt.Message, RequestContext], Awaitable[None]]
    ) -> Handler:
        """Check a request's properties and size, then queue ``handler`` for a turn."""

        async def admit(message: aiomqtt.Message) -> None:
            ctx = RequestContext.from_message(message, self.reserved_prefixes)
            payload = message.payload if isinstance(message.payload, bytes) else b""
            limits = self.settings.limits
            try:
                if ctx.problem is not None:
                    raise ctx.problem
                if len(payload) > limits.max_upload_bytes:
                    raise PayloadTooLargeError(
                        "max_upload_bytes",
                        limits.max_upload_bytes,
                        what=f"payload of {len(payload)} bytes",
                        unit="bytes",
                    )

                async def work() -> None:
                    await handler(message, ctx)

                self.submit(ctx.client_key, ctx.topic, work, len(payload), ctx)
            except EdgeVoiceError as exc:
                await self.report_error(ctx.topic, exc, ctx.user.get("id"), ctx)

        return admit

    # ------------------------------------------------------------ admission

    def submit(
        self,
        client_key: str,
        topic: str,
        work: Callable[[], Awaitable[None]],
        size_bytes: int,
        ctx: RequestContext | None = None,
    ) -> None:
        """Admit a request: it gets a task when a turn is free (round robin over clients).

        Raises :class:`BusyError` when the client already has
        ``limits.max_pending_per_client`` requests queued or running, or the
        queue is full (:data:`MAX_QUEUED_REQUESTS`, twice ``max_upload_bytes``
        of payloads); :class:`ShuttingDownError` after :meth:`stop` began.
        ``work`` reports its own errors; it runs in ``client_scope("mqtt", client_key)``.
        """
        if not self._accepting:
            raise ShuttingDownError("node is shutting down")
        limit = self.settings.limits.max_pending_per_client
        pending = self._pending.get(client_key, 0)
        if pending >= limit:
            who = "this client" if client_key else "clients without an identity"
            raise BusyError(
                f"{pending} requests of {who} are pending "
                f"(limits.max_pending_per_client = {limit}); retry later"
            )
        max_bytes = 2 * self.settings.limits.max_upload_bytes
        if self._queued >= MAX_QUEUED_REQUESTS or (
            self._queued and self._queued_bytes + size_bytes > max_bytes
        ):
            raise BusyError("too many requests are queued on this node; retry later")
        self._pending[client_key] = pending + 1
        self._queue.setdefault(client_key, deque()).append(
            _Queued(client_key, topic, work, size_bytes, ctx)
        )
        self._queued += 1
        self._queued_bytes += size_bytes
        self._idle.clear()
        self._start_next()

    def _start_next(self) -> None:
        """Start queued requests while turns are free: the task is created only now."""
        while len(self._tasks) < MAX_CONCURRENT_REQUESTS and self._queue:
            client_key, waiting = next(iter(self._queue.items()))
            item = waiting.popleft()
            if waiting:
                self._queue.move_to_end(client_key)
            else:
                del self._queue[client_key]
            self._queued -= 1
            self._queued_bytes -= item.size_bytes
            task = asyncio.create_task(self._run_request(item), name=f"mqtt {item.topic}")
            self._tasks.add(task)
            task.add_done_callback(functools.partial(self._request_done, client_key=client_key))

    def _request_done(self, task: asyncio.Task[None], *, client_key: str) -> None:
        self._tasks.discard(task)
        self._release(client_key)
        self._start_next()

    def _release(self, client_key: str) -> None:
        left = self._pending.get(client_key, 1) - 1
        if left > 0:
            self._pending[client_key] = left
        else:
            self._pending.pop(client_key, None)
        if not self._tasks and not self._queue:
            self._idle.set()

    async def _run_request(self, item: _Queued) -> None:
        with client_scope("mqtt", item.client_key):
            try:
                await item.work()
            except asyncio.CancelledError:
                await asyncio.shield(
                    self.report_error(
                        item.topic,
                        ShuttingDownError("request cancelled at shutdown"),
                        None,
                        item.ctx,
                    )
                )
                raise
            except Exception as exc:  # handlers report their own errors; this is a last resort
                await self.report_error(item.topic, exc, None, item.ctx)

    def spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        """Run a small bookkeeping coroutine (an error report from a timer) as an owned task."""
        task = asyncio.create_task(coro, name=name)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # --------------------------------------------------------------- errors

    def _error_message(
        self, fields: dict[str, Any], topic: str, request_id: str | None
    ) -> OutgoingMessage:
        data: dict[str, Any] = {**fields, "topic": topic}
        if request_id is not None:
            data["id"] = request_id
        return OutgoingMessage(self.error_topic, json.dumps(data).encode(), what="error report")

    async def report_error(
        self,
        topic: str,
        exc: BaseException,
        request_id: str | None,
        ctx: RequestContext | None = None,
    ) -> None:
        """A failed request → ``<base>/error`` (and the MQTT 5 response topic, if any).

        ``request_id`` is only included when it is a valid id; ``ctx``'s
        response topic was checked when the request came in.
        """
        fields = error_fields(exc)
        if isinstance(exc, ClientError):
            _LOGGER.info("MQTT request on %s rejected: %s", topic, exc)
        elif isinstance(exc, EdgeVoiceError | asyncio.CancelledError):
            _LOGGER.warning("MQTT request on %s failed: %s", topic, fields["error"])
        else:
            _LOGGER.error("MQTT request on %s failed", topic, exc_info=exc)
        request_id = valid_id(request_id)
        await self.publish(self._error_message(fields, topic, request_id))
        if ctx is not None and ctx.response_topic:
            reply: dict[str, Any] = {**fields, "node_id": self.node_id}
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

    # ------------------------------------------------------------- handlers

    @staticmethod
    async def _parse(parse: Callable[[bytes], T], payload: bytes) -> T:
        """Parse inline when small, in a worker thread when large (JSON of megabytes)."""
        if len(payload) <= _INLINE_PARSE_BYTES:
            return parse(payload)
        return await asyncio.to_thread(parse, payload)

    async def _handle_say(self, message: aiomqtt.Message, ctx: RequestContext) -> None:
        request_id = ctx.user.get("id")
        try:
            payload = message.payload if isinstance(message.payload, bytes) else b""
            request = await self._parse(parse_say, payload)
            request_id = request.id or request_id
            if len(request.text) > self.settings.limits.max_input_chars:
                raise input_limit_error(self.settings.limits, param="text")
            await self.speak(request, request_id or new_id(), ctx)
        except MqttRequestError as exc:
            await self.report_error(ctx.topic, exc, exc.request_id or request_id, ctx)
        except Exception as exc:
            await self.report_error(ctx.topic, exc, request_id, ctx)

    async def render_speech(
        self, text: str, voice: str | None, speed: float, fmt: str
    ) -> tuple[bytes, float]:
        """Speak ``text`` through the shared pipeline and encode it: (audio, duration in s).

        The pipeline cuts the text into bounded sentences and synthesizes them
        in the engine's workers; joining and encoding run in a worker thread.
        Raises what :func:`~edgevoice.pipeline.speak.speak` raises (unknown
        voice, text over ``max_input_chars``, engine errors).
        """
        options = SynthesizeOptions(voice=voice or self._voice or None, speed=speed)
        options = await self.hub.resolve_voice(options)  # a stored voice id clones
        parts: list[FloatAudio] = []
        async with speak(self.hub, text, options) as speech:
            async for audio in speech:
                parts.append(audio.samples)
            rate_hz = speech.rate_hz
        samples = sum(len(p) for p in parts)
        encoded = await asyncio.to_thread(_join_and_encode, parts, rate_hz, fmt)
        return encoded, samples / rate_hz

    async def speak(self, request: SayRequest, request_id: str, ctx: RequestContext) -> None:
        encoded, duration_s = await self.render_speech(
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
            # On the local speaker ([audio_io]), in order with everything else it plays.
            from edgevoice.audio_io.peers import play_on_speaker

            done.update(await play_on_speaker(self.hub, encoded, f"speak request {request_id}"))
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
            request, audio_bytes = await self._parse(parse_transcribe, payload)
            if request is not None:
                request_id = request.id or request_id
            language = (request.language if request else None) or ctx.user.get("language")
            model = (request.model if request else None) or ctx.user.get("model")
            options = TranscribeOptions(
                language=language or None,
                task=request.task if request else "transcribe",
                prompt=request.prompt if request else None,
            )
            # The model is resolved once (unknown → error before decoding) and held.
            async with self.hub.asr_session(model, options) as session:
                # Decoded straight to the model's rate; stops as soon as the audio is
                # longer than the limit (declared in the container, or counted).
                audio = await asyncio.to_thread(
                    decode,
                    audio_bytes,
                    rate_hz=session.rate_hz,
                    max_duration_s=self.settings.limits.max_audio_s,
                )
                del audio_bytes
                transcript = await session.transcribe(audio)
            ctx.check_expiry()
            request_id = request_id or new_id()
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
        except MqttRequestError as exc:
            await self.report_error(ctx.topic, exc, exc.request_id or request_id, ctx)
        except Exception as exc:
            await self.report_error(ctx.topic, exc, request_id, ctx)

    async def _handle_voice_set(self, message: aiomqtt.Message) -> None:
        topic = str(message.topic)
        payload = message.payload if isinstance(message.payload, bytes) else b""
        try:
            if len(payload) > 1024:
                raise MqttRequestError("voice name is longer than 1024 bytes")
            try:
                name = payload.decode("utf-8").strip()
            except UnicodeDecodeError:
                raise MqttRequestError("voice name is not UTF-8 text") from None
            self.hub.voice(name or None)
        except EdgeVoiceError as exc:
            await self.report_error(topic, exc, None)
            return
        self._voice = name or None
        _LOGGER.info("Default voice for MQTT speak requests: %s", self._current_voice())
        await self.publish(self._voice_message())

    async def _handle_ha_status(self, message: aiomqtt.Message) -> None:
        if message.payload == b"online":
            _LOGGER.info("Home Assistant came online; republishing discovery")
            await self.publish(self._discovery_message())


def _join_and_encode(parts: list[FloatAudio], rate_hz: int, fmt: str) -> bytes:
    """Blocking: one clip from the spoken chunks, encoded as ``fmt``."""
    samples = np.concatenate(parts) if parts else np.zeros(0, dtype=np.float32)
    return encode(samples, rate_hz, fmt)


def _code(exc: aiomqtt.MqttCodeError) -> int | None:
    rc = exc.rc
    if rc is None:
        return None
    if isinstance(rc, int):
        return rc
    return int(rc.value)


__all__ = [
    "MAX_CONCURRENT_REQUESTS",
    "OUTPUT_FORMATS",
    "MqttBridge",
    "parse_broker_url",
]
