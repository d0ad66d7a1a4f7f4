"""ESPHome native API frames: plaintext, and noise (``Noise_NNpsk0_25519_ChaChaPoly_SHA256``).

Plaintext frame: ``0x00``, varint payload length, varint message type, payload.
Noise: every frame is ``0x01``, a 2-byte big-endian length and that many bytes.
The client opens with an empty frame (its hello) and a handshake frame
(``0x00`` + noise message); the server answers with its hello (``0x01``,
name, ``\\0``, MAC, ``\\0``) and its handshake frame; after that each frame
is an encrypted ``type(2) length(2) payload``. Frames are bounded by
:data:`MAX_FRAME_BYTES`; anything malformed raises :class:`FrameError`.

Event-loop only; the noise cipher work is small per frame.
"""

from __future__ import annotations

import asyncio
import binascii
import importlib
from typing import Any, Protocol

MAX_FRAME_BYTES = 256 * 1024
"""Largest plaintext payload accepted (Home Assistant's messages are far smaller)."""
NOISE_PROLOGUE = b"NoiseAPIInit\x00\x00"
NOISE_PROTOCOL = b"Noise_NNpsk0_25519_ChaChaPoly_SHA256"


class FrameError(Exception):
    """A frame that breaks the protocol (the connection is closed)."""


class FrameCodec(Protocol):
    async def handshake(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Run the codec's opening exchange (nothing for plaintext)."""
        ...

    async def read(self, reader: asyncio.StreamReader) -> tuple[int, bytes]:
        """The next ``(message type, payload)``; :class:`asyncio.IncompleteReadError` at EOF."""
        ...

    def pack(self, type_id: int, payload: bytes) -> bytes:
        """One frame carrying a message."""
        ...


def varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


async def _read_varint(reader: asyncio.StreamReader) -> int:
    result = 0
    for shift in range(0, 35, 7):
        byte = (await reader.readexactly(1))[0]
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result
    raise FrameError("varint too long")


class PlainFrames:
    """The plaintext protocol."""

    async def handshake(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        return None

    async def read(self, reader: asyncio.StreamReader) -> tuple[int, bytes]:
        preamble = (await reader.readexactly(1))[0]
        if preamble == 0x01:
            raise FrameError(
                "the client speaks the encrypted protocol; set audio_io.esphome_encryption_key"
            )
        if preamble != 0x00:
            raise FrameError(f"bad preamble byte {preamble:#x}")
        length = await _read_varint(reader)
        type_id = await _read_varint(reader)
        if length > MAX_FRAME_BYTES:
            raise FrameError(f"frame of {length} bytes (limit {MAX_FRAME_BYTES})")
        payload = await reader.readexactly(length) if length else b""
        return type_id, payload

    def pack(self, type_id: int, payload: bytes) -> bytes:
        return b"\x00" + varint(len(payload)) + varint(type_id) + payload


def decode_key(key: str) -> bytes:
    """A base64 noise key (ESPHome's ``api: encryption: key``) → 32 bytes."""
    try:
        raw = binascii.a2b_base64(key.strip())
    except binascii.Error as exc:
        raise ValueError(f"audio_io.esphome_encryption_key is not base64: {exc}") from None
    if len(raw) != 32:
        raise ValueError("audio_io.esphome_encryption_key must be 32 bytes, base64-encoded")
    return raw


def _noise_frame(data: bytes) -> bytes:
    if len(data) > 0xFFFF:
        raise FrameError(f"noise frame of {len(data)} bytes")
    return bytes((0x01, len(data) >> 8, len(data) & 0xFF)) + data


class NoiseFrames:
    """The encrypted protocol, as the device (noise responder)."""

    def __init__(self, psk: bytes, name: str, mac: str) -> None:
        try:
            noise_connection = importlib.import_module("noise.connection")
        except ImportError as exc:
            raise RuntimeError(
                f"ESPHome encryption needs the noiseprotocol package ({exc}); "
                "install edgevoice[audio-io]"
            ) from None
        proto: Any = noise_connection.NoiseConnection.from_name(NOISE_PROTOCOL)
        proto.set_as_responder()
        proto.set_psks(psk)
        proto.set_prologue(NOISE_PROLOGUE)
        proto.start_handshake()
        self._proto = proto
        self._hello = (
            b"\x01" + name.encode() + b"\x00" + mac.replace(":", "").lower().encode() + b"\x00"
        )

    @staticmethod
    async def _read_frame(reader: asyncio.StreamReader) -> bytes:
        header = await reader.readexactly(3)
        if header[0] != 0x01:
            if header[0] == 0x00:
                raise FrameError("the client speaks plaintext, but encryption is configured")
            raise FrameError(f"bad noise preamble byte {header[0]:#x}")
        length = (header[1] << 8) | header[2]
        return await reader.readexactly(length) if length else b""

    async def handshake(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await self._read_frame(reader)  # the client's hello (empty)
        writer.write(_noise_frame(self._hello))
        message = await self._read_frame(reader)
        if not message or message[0] != 0x00:
            raise FrameError("bad noise handshake frame")
        try:
            self._proto.read_message(message[1:])
        except Exception:
            writer.write(_noise_frame(b"\x01Handshake MAC failure"))
            await writer.drain()
            raise FrameError("noise handshake failed (wrong encryption key?)") from None
        writer.write(_noise_frame(b"\x00" + self._proto.write_message()))
        await writer.drain()

    async def read(self, reader: asyncio.StreamReader) -> tuple[int, bytes]:
        frame = await self._read_frame(reader)
        try:
            message: bytes = self._proto.decrypt(frame)
        except Exception:
            raise FrameError("a frame failed to decrypt") from None
        if len(message) < 4:
            raise FrameError("decrypted frame too short")
        type_id = (message[0] << 8) | message[1]
        length = (message[2] << 8) | message[3]
        return type_id, message[4 : 4 + length]

    def pack(self, type_id: int, payload: bytes) -> bytes:
        header = bytes((type_id >> 8, type_id & 0xFF, len(payload) >> 8, len(payload) & 0xFF))
        encrypted: bytes = self._proto.encrypt(header + payload)
        return _noise_frame(encrypted)
