"""``/v1/audio/speech/stream``: a WebSocket that takes text in pieces and sends audio.

First message: JSON options (``model``, ``voice``, ``response_format``
(default ``pcm``), ``speed``, ``instructions``, cloning fields). Then
``{"text_chunk": "...", "is_final": false}`` messages; the server sends one
binary message per synthesized piece as soon as a sentence is complete and
``{"type": "done", ...}`` after each ``is_final``. Errors are
``{"type": "error", "error": {...}}`` events (OpenAI's shape).

Bounds: a message over ``limits.max_ws_message_bytes`` closes the socket
(1009); more than ``limits.max_input_chars`` characters waiting to be spoken
is an error event and the socket closes (1008); no message for
``limits.session_timeout_s`` closes it (1000); at most
``limits.max_connections`` streams are open at once.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
from typing import Final

from aiohttp import WSCloseCode, WSMsgType, hdrs, web

from edgevoice.audio import OUTPUT_FORMATS
from edgevoice.engines.base import SynthesizeOptions
from edgevoice.errors import BusyError, ClientError, EdgeVoiceError, LimitExceededError
from edgevoice.pipeline.speak import TextFeed, speak
from edgevoice.protocols.http.errors import ApiError, client_error, error_payload
from edgevoice.protocols.http.forms import optional_str, parse_bool, parse_choice, parse_float
from edgevoice.protocols.http.speech import SPEED_RANGE, OutputEncoder, resolve_speech_target
from edgevoice.protocols.http.state import ServerState, state

_LOGGER = logging.getLogger(__name__)

STREAM_PATH: Final = "/v1/audio/speech/stream"


class _Utterances:
    """Utterances waiting to be spoken, in order: one :class:`TextFeed` each.

    The reader puts chunks into the newest feed; a worker speaks the feeds one
    after the other. Bounds: all feeds together hold at most ``max_chars`` of
    text not yet taken for synthesis, and at most ``max_waiting`` utterances
    wait. Event-loop only.
    """

    def __init__(self, max_chars: int, max_waiting: int) -> None:
        self.max_chars = max_chars
        self.max_waiting = max_waiting
        self.feeds: collections.deque[TextFeed] = collections.deque()
        """Feeds not yet finished, oldest (being spoken) first."""
        self.ready = asyncio.Event()
        self._open: TextFeed | None = None

    def feed(self, chunk: str, final: bool) -> None:
        waiting = sum(f.pending_chars for f in self.feeds)
        if waiting + len(chunk) > self.max_chars:
            raise LimitExceededError(
                "max_input_chars",
                self.max_chars,
                what="text waiting to be spoken",
                unit="characters; wait for audio before sending more",
                param="text_chunk",
            )
        if self._open is None:
            if len(self.feeds) >= self.max_waiting:
                raise BusyError(
                    f"{self.max_waiting} utterances are waiting to be spoken "
                    "(limits.max_pending_per_client); wait for a done event"
                )
            # The feed's own bound is the stream's: the sum is checked above.
            self._open = TextFeed(self.max_chars)
            self.feeds.append(self._open)
            self.ready.set()
        self._open.put(chunk)
        if final:
            self._open.close()
            self._open = None

    async def next_feed(self) -> TextFeed:
        while not self.feeds:
            self.ready.clear()
            await self.ready.wait()
        return self.feeds[0]

    def finished(self, feed: TextFeed) -> None:
        self.feeds.remove(feed)
        if feed is self._open:
            self._open = None


def _parse_message(data: str) -> tuple[str, bool]:
    try:
        event = json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise client_error(f"message is not valid JSON: {exc}") from None
    chunk = event.get("text_chunk", event.get("text", "")) if isinstance(event, dict) else None
    if not isinstance(chunk, str):
        raise client_error('messages must be {"text_chunk": "...", "is_final": false}')
    return chunk, parse_bool(event.get("is_final"), "is_final")


async def _send_error(ws: web.WebSocketResponse, exc: BaseException) -> None:
    with contextlib.suppress(ConnectionError):
        await ws.send_json({"type": "error", **error_payload(exc)})


async def _options(
    ws: web.WebSocketResponse, st: ServerState, timeout_s: float
) -> tuple[SynthesizeOptions, str] | None:
    """The first message's options; None (after an error event) when they are bad."""
    first = await ws.receive(timeout=timeout_s)
    if first.type is not WSMsgType.TEXT:
        return None
    try:
        try:
            config = json.loads(first.data)
        except (ValueError, RecursionError) as exc:
            raise client_error(f"message is not valid JSON: {exc}") from None
        if not isinstance(config, dict):
            raise client_error("the first message must be a JSON object of options")
        fmt = parse_choice(config.get("response_format"), "response_format", OUTPUT_FORMATS, "pcm")
        speed = parse_float(config.get("speed"), "speed", *SPEED_RANGE) or 1.0
        target = await resolve_speech_target(st, config, {})
        options = SynthesizeOptions(
            voice=target.voice,
            speed=speed,
            instructions=optional_str(config.get("instructions"), "instructions"),
            reference=target.reference,
        )
    except EdgeVoiceError as exc:
        await _send_error(ws, exc)
        return None
    return options, fmt


async def speech_stream(request: web.Request) -> web.StreamResponse:
    """``/v1/audio/speech/stream``: text in pieces → binary audio per sentence."""
    st = state(request)
    limits = st.settings.limits
    if "websocket" not in request.headers.get(hdrs.UPGRADE, "").lower():
        raise ApiError(
            426,
            f"{STREAM_PATH} is a WebSocket: connect with a WebSocket client",
            code="upgrade_required",
            headers={hdrs.UPGRADE: "websocket", hdrs.CONNECTION: "Upgrade"},
        )
    if len(st.websockets) >= limits.max_connections:
        raise BusyError(
            f"{limits.max_connections} speech streams are open (limits.max_connections)"
        )
    ws = web.WebSocketResponse(heartbeat=30.0, max_msg_size=limits.max_ws_message_bytes)
    await ws.prepare(request)
    st.websockets.add(ws)
    worker: asyncio.Task[None] | None = None
    try:
        chosen = await _options(ws, st, limits.session_timeout_s)
        if chosen is None:
            return ws
        options, fmt = chosen
        utterances = _Utterances(limits.max_input_chars, limits.max_pending_per_client)
        worker = asyncio.create_task(_synthesize(ws, st, options, fmt, utterances))
        while True:
            message = await ws.receive(timeout=limits.session_timeout_s)
            # Buffered messages are returned without yielding: a flood of them
            # must not hold the loop (the speech worker, /health).
            await asyncio.sleep(0)
            if message.type in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED):
                break
            if message.type is WSMsgType.ERROR:
                # aiohttp closed the socket already (a message over max_msg_size: 1009).
                _LOGGER.debug("WebSocket speech stream: %s", message.data)
                break
            if message.type is not WSMsgType.TEXT:
                continue
            try:
                chunk, final = _parse_message(message.data)
                utterances.feed(chunk, final)
            except (LimitExceededError, BusyError) as exc:
                await _send_error(ws, exc)
                await ws.close(code=WSCloseCode.POLICY_VIOLATION, message=b"limit exceeded")
                break
            except ClientError as exc:
                await _send_error(ws, exc)
    except TimeoutError:
        _LOGGER.debug("WebSocket speech stream idle for %.0f s; closing", limits.session_timeout_s)
    finally:
        st.websockets.discard(ws)
        if worker is not None:
            worker.cancel()
            await asyncio.gather(worker, return_exceptions=True)
        await ws.close()
    return ws


async def _synthesize(
    ws: web.WebSocketResponse,
    st: ServerState,
    options: SynthesizeOptions,
    fmt: str,
    utterances: _Utterances,
) -> None:
    """Speak the utterances in order: binary audio, then a ``done`` event for each."""
    while True:
        feed = await utterances.next_feed()
        try:
            await _speak_utterance(ws, st, options, fmt, feed)
        except LimitExceededError as exc:
            # More unpunctuated text than the pipeline may hold: the stream ends.
            _LOGGER.debug("WebSocket speech: %s", exc)
            await _send_error(ws, exc)
            await ws.close(code=WSCloseCode.POLICY_VIOLATION, message=b"limit exceeded")
            return
        except ClientError as exc:
            _LOGGER.debug("WebSocket speech: %s", exc)
            await _send_error(ws, exc)
        except (ConnectionError, asyncio.CancelledError):
            raise
        except Exception as exc:
            _LOGGER.error("WebSocket speech failed", exc_info=exc)
            await _send_error(ws, exc)
        finally:
            utterances.finished(feed)


async def _speak_utterance(
    ws: web.WebSocketResponse,
    st: ServerState,
    options: SynthesizeOptions,
    fmt: str,
    feed: TextFeed,
) -> None:
    encoder: OutputEncoder | None = None
    async with speak(st.hub, feed, options, st.settings.limits) as spoken:
        try:
            async for chunk in spoken:
                if encoder is None:
                    encoder = await asyncio.to_thread(OutputEncoder, fmt, spoken.rate_hz)
                if data := await asyncio.to_thread(encoder.write, chunk.samples):
                    await ws.send_bytes(data)
            if encoder is not None and (tail := await asyncio.to_thread(encoder.close)):
                await ws.send_bytes(tail)
            await ws.send_json(
                {
                    "type": "done",
                    "sentences": spoken.sentences,
                    "audio_seconds": round(spoken.audio_s, 3),
                    "format": fmt,
                    "sample_rate": encoder.rate_hz if encoder else None,
                }
            )
        finally:
            st.metrics.add_audio("out", spoken.model.name, spoken.audio_s)
