"""The ESPHome native API server: connections, handshake, device info, entities.

What Home Assistant's ESPHome integration does on connect, and what we answer:

``HelloRequest`` → ``HelloResponse`` (API 1.10, our name); ``AuthenticationRequest``
(no password: nothing to answer); ``DeviceInfoRequest`` → ``DeviceInfoResponse``
(voice assistant feature flags); ``ListEntitiesRequest`` → a media player
(key 1) and a mute switch (key 2), then ``ListEntitiesDoneResponse``;
``SubscribeStatesRequest`` → their states (and every later change);
``PingRequest`` → ``PingResponse``; ``DisconnectRequest`` → ``DisconnectResponse``.
Voice-assistant messages go to the :class:`Satellite` (:mod:`.satellite`);
other subscriptions (logs, Home Assistant states/services) are accepted and
ignored.

Bounds: ``[limits] max_connections`` connections (at most 16); the handshake
and hello must come within ``header_timeout_s``; a connection silent for
``idle_timeout_s`` (Home Assistant pings every 20 s) or whose client stops
reading (:data:`MAX_WRITE_BUFFER_BYTES` unsent) is closed; frames are capped
(:data:`~.framing.MAX_FRAME_BYTES`); a malformed frame closes that connection
only. Event-loop only.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any, Protocol

from edgevoice import __version__
from edgevoice.audio_io.esphome.framing import FrameCodec, FrameError, NoiseFrames, PlainFrames
from edgevoice.audio_io.esphome.messages import decode, encode, pb
from edgevoice.audio_io.esphome.zeroconf import ESPHOME_VERSION

_LOGGER = logging.getLogger(__name__)

API_VERSION = (1, 10)
MAX_WRITE_BUFFER_BYTES = 4 * 1024 * 1024
"""Unsent bytes after which a client that stopped reading is dropped."""
MEDIA_PLAYER_KEY = 1
MUTE_SWITCH_KEY = 2


class Satellite(Protocol):
    """What the server needs from the voice side (:class:`~.satellite.EsphomeSatellite`)."""

    feature_flags: int
    muted: bool

    def media_player_state(self) -> Any: ...

    def handle_voice_message(self, connection: ApiConnection, message: Any) -> None: ...

    def handle_entity_command(self, connection: ApiConnection, message: Any) -> None: ...

    def connection_lost(self, connection: ApiConnection) -> None: ...


class ApiConnection:
    """One client (Home Assistant, a dashboard, a test's ``APIClient``)."""

    def __init__(
        self,
        server: EsphomeApiServer,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        codec: FrameCodec,
    ) -> None:
        self.server = server
        self.reader = reader
        self.writer = writer
        self.codec = codec
        peer = writer.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        self.client_info = ""
        self.subscribed_states = False
        self.closed = False

    def send(self, *messages: Any) -> None:
        """Queue messages to the client (never blocks); a client that stopped
        reading is dropped."""
        if self.closed or not messages:
            return
        transport = self.writer.transport
        if transport.is_closing():
            self.close()
            return
        if transport.get_write_buffer_size() > MAX_WRITE_BUFFER_BYTES:
            _LOGGER.info("ESPHome client %s stopped reading; closing", self.peer)
            self.close()
            return
        self.writer.write(b"".join(self.codec.pack(*encode(m)) for m in messages))

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.writer.close()


class EsphomeApiServer:
    """Listens for ESPHome API clients and answers the device-side messages."""

    def __init__(
        self,
        satellite: Satellite,
        *,
        host: str,
        port: int,
        name: str,
        friendly_name: str,
        mac: str,
        psk: bytes | None,
        max_connections: int,
        idle_timeout_s: float,
        hello_timeout_s: float,
    ) -> None:
        self.satellite = satellite
        self.host = host
        self.port = port
        self.name = name
        self.friendly_name = friendly_name
        self.mac = mac
        self.psk = psk
        self.max_connections = max_connections
        self.idle_timeout_s = idle_timeout_s
        self.hello_timeout_s = hello_timeout_s
        self.connections: set[ApiConnection] = set()
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.bound_port = port

    async def start(self) -> None:
        if self.psk is not None:
            # Import the noise library (and check it is there) off the loop, once.
            await asyncio.to_thread(NoiseFrames, self.psk, self.name, self.mac)
        self._server = await asyncio.start_server(self._accept, self.host, self.port)
        self.bound_port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for connection in list(self.connections):
            connection.send(pb.DisconnectRequest())
            connection.close()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2.0)
            self._server = None

    @property
    def address(self) -> str:
        return f"tcp://{self.host}:{self.bound_port}"

    def broadcast_states(self, *messages: Any) -> None:
        """Send entity state changes to every client subscribed to states."""
        for connection in list(self.connections):
            if connection.subscribed_states:
                connection.send(*messages)

    # ------------------------------------------------------------ connections

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        codec: FrameCodec = (
            NoiseFrames(self.psk, self.name, self.mac) if self.psk is not None else PlainFrames()
        )
        connection = ApiConnection(self, reader, writer, codec)
        try:
            if len(self.connections) >= self.max_connections:
                _LOGGER.warning(
                    "ESPHome API: refusing %s (limit of %d connections)",
                    connection.peer,
                    self.max_connections,
                )
                return
            self.connections.add(connection)
            _LOGGER.debug("ESPHome API: %s connected", connection.peer)
            # The handshake and the hello come quickly or never (a silent socket
            # must not hold one of the few connection slots for idle_timeout_s).
            await asyncio.wait_for(codec.handshake(reader, writer), self.hello_timeout_s)
            timeout_s = self.hello_timeout_s
            while not connection.closed:
                type_id, payload = await asyncio.wait_for(codec.read(reader), timeout_s)
                timeout_s = self.idle_timeout_s
                message = decode(type_id, payload)
                if message is None:
                    _LOGGER.debug("ESPHome API: unknown message type %d ignored", type_id)
                    continue
                self._handle(connection, message)
        except (asyncio.IncompleteReadError, ConnectionError, OSError):
            _LOGGER.debug("ESPHome API: %s went away", connection.peer)
        except TimeoutError:
            _LOGGER.info("ESPHome API: %s went silent; closed", connection.peer)
        except (FrameError, ValueError) as exc:
            _LOGGER.warning("ESPHome API: closing %s: %s", connection.peer, exc)
        finally:
            self.connections.discard(connection)
            connection.close()
            try:
                self.satellite.connection_lost(connection)
            except Exception:
                _LOGGER.exception("ESPHome API: cleanup after %s failed", connection.peer)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), 2.0)
            self._tasks.discard(task)

    # --------------------------------------------------------------- messages

    def _handle(self, connection: ApiConnection, message: Any) -> None:
        satellite = self.satellite
        if isinstance(message, pb.HelloRequest):
            connection.client_info = str(message.client_info)[:100]
            _LOGGER.info("ESPHome API: %s (%s) connected", connection.client_info, connection.peer)
            connection.send(
                pb.HelloResponse(
                    api_version_major=API_VERSION[0],
                    api_version_minor=API_VERSION[1],
                    server_info=f"edgevoice {__version__}",
                    name=self.name,
                )
            )
        elif isinstance(message, pb.AuthenticationRequest):
            pass  # no password: a device without one answers nothing
        elif isinstance(message, pb.PingRequest):
            connection.send(pb.PingResponse())
        elif isinstance(message, pb.DisconnectRequest):
            connection.send(pb.DisconnectResponse())
            connection.close()
        elif isinstance(message, (pb.DisconnectResponse, pb.PingResponse, pb.GetTimeResponse)):
            pass
        elif isinstance(message, pb.DeviceInfoRequest):
            connection.send(self._device_info())
        elif isinstance(message, pb.ListEntitiesRequest):
            connection.send(*self._entities(), pb.ListEntitiesDoneResponse())
        elif isinstance(message, pb.SubscribeStatesRequest):
            connection.subscribed_states = True
            connection.send(*self.states())
        elif isinstance(message, (pb.SwitchCommandRequest, pb.MediaPlayerCommandRequest)):
            satellite.handle_entity_command(connection, message)
        elif type(message).__name__.startswith(("VoiceAssistant", "SubscribeVoiceAssistant")):
            satellite.handle_voice_message(connection, message)
        else:
            _LOGGER.debug("ESPHome API: %s ignored", type(message).__name__)

    def _device_info(self) -> Any:
        return pb.DeviceInfoResponse(
            uses_password=False,
            name=self.name,
            friendly_name=self.friendly_name,
            mac_address=self.mac,
            esphome_version=ESPHOME_VERSION,
            compilation_time="",
            model="edgevoice voice satellite",
            manufacturer="edgevoice",
            project_name="edgevoice.edgevoice",
            project_version=__version__,
            voice_assistant_feature_flags=self.satellite.feature_flags,
            api_encryption_supported=self.psk is not None,
        )

    def _entities(self) -> list[Any]:
        features = _media_player_features()
        formats = [
            pb.MediaPlayerSupportedFormat(
                format="flac", sample_rate=48000, num_channels=1, purpose=purpose, sample_bytes=2
            )
            for purpose in (0, 1)  # DEFAULT, ANNOUNCEMENT
        ]
        return [
            pb.ListEntitiesMediaPlayerResponse(
                object_id="media_player",
                key=MEDIA_PLAYER_KEY,
                name="Media Player",
                supports_pause=False,
                supported_formats=formats,
                feature_flags=features,
            ),
            pb.ListEntitiesSwitchResponse(
                object_id="mute",
                key=MUTE_SWITCH_KEY,
                name="Mute",
                icon="mdi:microphone-off",
                entity_category=1,  # config
            ),
        ]

    def states(self) -> list[Any]:
        return [
            self.satellite.media_player_state(),
            pb.SwitchStateResponse(key=MUTE_SWITCH_KEY, state=self.satellite.muted),
        ]


def _media_player_features() -> int:
    from aioesphomeapi.model import MediaPlayerEntityFeature as F

    return int(F.PLAY_MEDIA | F.STOP | F.VOLUME_SET | F.VOLUME_MUTE | F.MEDIA_ANNOUNCE)
