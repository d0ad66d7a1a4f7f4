"""What the standalone voice loop does with a command: MQTT, a webhook, a
program, and Home Assistant's conversation API, several at once.

- **MQTT** (through the ``[mqtt]`` bridge of this daemon, when it runs):
  ``<base>/wake/detected``, ``<base>/asr/transcript`` ``{text, language,
  wake_word, duration_s, id, node_id}``, ``<base>/state`` (retained:
  ``idle``/``listening``/``thinking``/``speaking``).
- **Webhook**: ``POST`` of the same JSON; optionally speaks the answer.
- **Command**: a program (no shell) gets the text on stdin and
  ``EDGEVOICE_WAKE_WORD``/``EDGEVOICE_LANGUAGE`` in its environment; its
  stdout (bounded) can be spoken.
- **Home Assistant conversation**: ``POST <url>/api/conversation/process``
  with a long-lived token; the ``conversation_id`` is kept for follow-ups
  (:data:`CONVERSATION_KEEP_S`), the reply is spoken, and
  ``continue_conversation`` asks the loop to listen again without a wake word.

Every action is bounded (timeouts, response sizes) and its failure is one log
line; the others go on. Event-loop only; the program runs as a subprocess.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from edgevoice.audio_io import peers
from edgevoice.config import AudioIoConfig, AudioIoConversationConfig, Settings

_LOGGER = logging.getLogger(__name__)

MAX_RESPONSE_BYTES = 64 * 1024
"""Most of a webhook's or Home Assistant's response body read."""
CONVERSATION_KEEP_S = 300.0
"""A Home Assistant conversation id is reused this long after its last reply."""
LOOP_STATES = ("idle", "listening", "thinking", "speaking")


@dataclass(frozen=True, slots=True)
class Command:
    """One transcribed command."""

    text: str
    language: str
    wake_word: str | None
    """The wake word that started it (``None``: a follow-up without one)."""
    duration_s: float
    """Seconds of audio transcribed."""
    id: str

    def as_json(self, node_id: str) -> dict[str, Any]:
        return {
            "text": self.text,
            "language": self.language,
            "wake_word": self.wake_word,
            "duration_s": round(self.duration_s, 3),
            "id": self.id,
            "node_id": node_id,
        }


@dataclass(slots=True)
class Outcome:
    """What the actions ask of the loop afterwards."""

    replies: list[str] = field(default_factory=list)
    """Texts to speak, in this order."""
    continue_conversation: bool = False
    """Listen again without a wake word (Home Assistant said so)."""


def _read_secret_file(path: Path) -> str:
    """Blocking: a token file (relative paths under ``$CREDENTIALS_DIRECTORY``)."""
    creds = os.environ.get("CREDENTIALS_DIRECTORY")
    if not path.is_absolute() and creds:
        path = Path(creds) / path
    return path.read_text(encoding="utf-8").strip()


async def read_at_most(stream: aiohttp.StreamReader | asyncio.StreamReader, limit: int) -> bytes:
    """Everything ``stream`` gives until its end; :class:`ValueError` past ``limit`` bytes
    (nothing more is read then)."""
    parts: list[bytes] = []
    size = 0
    while chunk := await stream.read(64 * 1024):
        size += len(chunk)
        if size > limit:
            raise ValueError(f"larger than {limit} bytes")
        parts.append(chunk)
    return b"".join(parts)


async def _read_bounded(response: aiohttp.ClientResponse) -> bytes:
    try:
        return await read_at_most(response.content, MAX_RESPONSE_BYTES)
    except ValueError:
        raise ValueError(f"response larger than {MAX_RESPONSE_BYTES} bytes") from None


async def _discard(stream: asyncio.StreamReader) -> None:
    while await stream.read(64 * 1024):
        pass


def _kill_group(proc: asyncio.subprocess.Process) -> None:
    """Kill the program and whatever it started (its own process group)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


class Actions:
    """Runs the configured actions for the loop (see the module docstring)."""

    def __init__(self, settings: Settings, hub: Any, session: aiohttp.ClientSession) -> None:
        self.settings = settings
        self.config: AudioIoConfig = settings.audio_io
        self.hub = hub
        self.node_id = settings.mqtt.node_id
        self._session = session
        self._conversation_id: str | None = None
        self._conversation_at = 0.0
        self._warned_no_mqtt = False

    # ----------------------------------------------------------------- MQTT

    def _bridge(self) -> Any | None:
        if not self.config.mqtt.enabled:
            return None
        bridge = peers.find(self.hub, "mqtt")
        if bridge is None and not self._warned_no_mqtt and self.settings.mqtt.enabled:
            self._warned_no_mqtt = True
            _LOGGER.info("Voice loop: the MQTT bridge is not running; events are not published")
        return bridge

    async def wake(self, wake_word: str) -> None:
        """A wake word was heard."""
        bridge = self._bridge()
        if bridge is not None:
            await self._quietly("MQTT wake event", bridge.publish_wake(wake_word))

    async def state(self, state: str) -> None:
        """The loop's state changed (one of :data:`LOOP_STATES`)."""
        bridge = self._bridge()
        if bridge is not None:
            await self._quietly("MQTT state", bridge.publish_state(state))

    async def _publish_transcript(self, command: Command) -> None:
        bridge = self._bridge()
        if bridge is not None:
            await bridge.publish_json(
                f"{bridge.base}/asr/transcript", command.as_json(bridge.node_id)
            )

    @staticmethod
    async def _quietly(what: str, awaitable: Any) -> None:
        try:
            await awaitable
        except Exception as exc:
            _LOGGER.warning("Voice loop: %s failed: %s", what, exc)

    # -------------------------------------------------------------- command

    async def handle(self, command: Command) -> Outcome:
        """Run every configured action at once; their replies in a fixed order
        (webhook, command, Home Assistant)."""
        config = self.config
        jobs: dict[str, Any] = {"mqtt": self._publish_transcript(command)}
        if config.webhook.url:
            jobs["webhook"] = self._webhook(command)
        if config.command.argv:
            jobs["command"] = self._command(command)
        if config.conversation.url:
            jobs["conversation"] = self._conversation(command)
        results = await asyncio.gather(*jobs.values(), return_exceptions=True)
        outcome = Outcome()
        for name, result in zip(jobs, results, strict=True):
            if isinstance(result, BaseException):
                if isinstance(result, asyncio.CancelledError):
                    raise result
                _LOGGER.warning(
                    "Voice loop: the %s action failed: %s",
                    name,
                    str(result) or type(result).__name__,
                )
                continue
            if isinstance(result, Outcome):
                outcome.replies.extend(r for r in result.replies if r.strip())
                outcome.continue_conversation |= result.continue_conversation
        return outcome

    async def _webhook(self, command: Command) -> Outcome:
        config = self.config.webhook
        assert config.url is not None
        timeout = aiohttp.ClientTimeout(total=config.timeout_s)
        async with self._session.post(
            config.url,
            json=command.as_json(self.node_id),
            headers=config.headers,
            timeout=timeout,
        ) as response:
            body = await _read_bounded(response)
            if response.status >= 400:
                raise RuntimeError(f"{config.url} answered HTTP {response.status}")
            content_type = response.headers.get("Content-Type", "")
        if not config.speak_response or not body.strip():
            return Outcome()
        text = body.decode("utf-8", errors="replace")
        if "json" in content_type:
            data = json.loads(text)
            speech = data.get("speech") if isinstance(data, dict) else None
            return Outcome([speech] if isinstance(speech, str) else [])
        return Outcome([text.strip()])

    async def _command(self, command: Command) -> Outcome:
        config = self.config.command
        limit = self.settings.limits.max_input_chars * 4
        env = dict(os.environ)
        env["EDGEVOICE_WAKE_WORD"] = command.wake_word or ""
        env["EDGEVOICE_LANGUAGE"] = command.language
        proc = await asyncio.create_subprocess_exec(
            *config.argv,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL,
            env=env,
            start_new_session=True,  # its own process group: killed whole on timeout
        )
        assert proc.stdin is not None and proc.stdout is not None
        try:
            async with asyncio.timeout(config.timeout_s):
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    proc.stdin.write(command.text.encode() + b"\n")
                    await proc.stdin.drain()
                    proc.stdin.close()
                try:
                    output = await read_at_most(proc.stdout, limit)
                except ValueError:
                    raise ValueError(f"{config.argv[0]} wrote more than {limit} bytes") from None
                code = await proc.wait()
        except BaseException:
            _kill_group(proc)
            # wait() also waits for the pipes: drain what the dead group left in
            # stdout (at most a pipe buffer) so its end of file is seen.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(_discard(proc.stdout), 5.0)
                await asyncio.wait_for(proc.wait(), 5.0)
            raise
        if code != 0:
            raise RuntimeError(f"{config.argv[0]} exited with status {code}")
        text = output.decode("utf-8", errors="replace").strip()
        return Outcome([text] if config.speak_output and text else [])

    # --------------------------------------------------- Home Assistant

    async def _token(self, config: AudioIoConversationConfig) -> str:
        if config.token is not None:
            return config.token.get_secret_value()
        if config.token_file is not None:
            return await asyncio.to_thread(_read_secret_file, config.token_file)
        raise RuntimeError("audio_io.conversation needs token or token_file")

    async def _conversation(self, command: Command) -> Outcome:
        config = self.config.conversation
        assert config.url is not None
        request: dict[str, Any] = {"text": command.text}
        language = config.language or command.language or self.config.language
        if language:
            request["language"] = language
        if config.agent_id:
            request["agent_id"] = config.agent_id
        if (
            self._conversation_id is not None
            and time.monotonic() - self._conversation_at < CONVERSATION_KEEP_S
        ):
            request["conversation_id"] = self._conversation_id
        token = await self._token(config)
        url = config.url.rstrip("/") + "/api/conversation/process"
        async with self._session.post(
            url,
            json=request,
            headers={"Authorization": f"Bearer {token}"},
            timeout=aiohttp.ClientTimeout(total=config.timeout_s),
        ) as response:
            body = await _read_bounded(response)
            if response.status >= 400:
                raise RuntimeError(f"Home Assistant answered HTTP {response.status}")
        data = json.loads(body)
        if not isinstance(data, dict):
            raise ValueError("Home Assistant's answer is not a JSON object")
        conversation_id = data.get("conversation_id")
        if isinstance(conversation_id, str) and conversation_id:
            self._conversation_id = conversation_id
            self._conversation_at = time.monotonic()
        speech = _reply_text(data)
        follow_up = bool(data.get("continue_conversation")) and config.follow_up
        if not follow_up:
            # The conversation is over: the next wake word starts a new one.
            self._conversation_at = 0.0
        _LOGGER.debug("Home Assistant replied %r (continue: %s)", speech, follow_up)
        return Outcome([speech] if speech and config.speak_reply else [], follow_up)


def _reply_text(data: dict[str, Any]) -> str:
    """``response.speech.plain.speech`` of a conversation result, or ``""``."""
    response = data.get("response")
    if not isinstance(response, dict):
        return ""
    speech = response.get("speech")
    if not isinstance(speech, dict):
        return ""
    plain = speech.get("plain")
    if isinstance(plain, dict) and isinstance(plain.get("speech"), str):
        return str(plain["speech"]).strip()
    return ""
