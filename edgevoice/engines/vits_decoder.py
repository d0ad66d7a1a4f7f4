"""A Piper (VITS) voice cut in two where its HiFi-GAN decoder begins, so that a
sentence's audio can be decoded in pieces.

Piper exports one ONNX graph: text encoder, duration predictor and flow turn
phoneme ids into a latent sequence (``[1, channels, frames]``, one frame per
``hop_length`` samples), and the decoder turns that into audio. The decoder is
convolutional: each sample depends only on the latent frames within its
receptive field. So a span of frames decoded with ``pad`` frames of context on
each side gives the same samples as decoding the whole sentence (checked when
the voice loads, to float rounding), and the first fraction of a second can be
played while the rest is decoded, without cutting the sentence's text (and its
intonation) in two.

The cut is found by node names (``/dec/…``, what Piper's exporter writes) and
accepted only if the decoder holds local operators alone; anything else is
``None`` and the voice runs whole. The two halves are written once to the
cache directory (:func:`cut_voice`), so later starts need neither the ``onnx``
package (imported only to cut) nor its time, and onnxruntime loads them from
files (a session made from bytes keeps the bytes). Blocking; call from a
worker thread.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import logging
import os
import shutil
import tempfile
import threading
import time
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

import numpy as np

from edgevoice.engines.base import FloatAudio

_LOGGER = logging.getLogger(__name__)

DECODER_PREFIX = "/dec/"
_LOCAL_OPS = frozenset(
    {"Conv", "ConvTranspose", "LeakyRelu", "Relu", "Add", "Sub", "Mul", "Div", "Tanh"}
)
"""Operators whose output at a time step depends on a bounded window of input."""
_SHAPE_OPS = frozenset({"Constant", "Identity", "Unsqueeze", "Squeeze"})
"""Operators allowed around the decoder (on its output, or giving constants)."""
CUT_FORMAT = 1
"""Part of the cache key: a change to how voices are cut makes earlier cuts unused."""
MAX_DIFFERENCE = 1e-4
"""How far a chunked decode may differ from the whole one (float rounding is ~1e-6)."""
PLAYING_SHARE = 0.6
"""Share of a sentence's first span's playing time its rest may take to decode
(the rest of that time covers the network, the player and a busier moment)."""


H = TypeVar("H", bytes, Path)


@dataclass(frozen=True)
class Halves(Generic[H]):
    """A voice's two halves (serialized, or as files) and how they join."""

    encoder: H
    decoder: H
    latent: str
    """The decoder input with a time axis (the flow's output)."""
    handoff: tuple[str, ...]
    """Everything the encoder hands the decoder (``latent`` first; a
    multi-speaker voice adds its speaker embedding)."""
    pad_frames: int
    """Frames of context decoded on each side of a span (the receptive field)."""


SplitVoice = Halves[bytes]
"""Just cut, for onnxruntime or the cache."""
CutVoice = Halves[Path]
"""Stored in the cache, what the engine loads."""


def cut_voice(path: Path, cache_dir: Path) -> CutVoice | None:
    """The voice at ``path`` cut before its decoder, from ``cache_dir`` or cut
    now (and kept there); None where it has no such cut or ``onnx`` is missing."""
    stat, source = path.stat(), path.resolve()
    key = f"{CUT_FORMAT}|{source}|{stat.st_size}|{stat.st_mtime_ns}"
    where = cache_dir / "piper-cut" / f"{path.stem}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"
    if not (where / "cut.json").is_file():
        try:
            split = split_voice(path)
        except ImportError:
            _LOGGER.info("onnx is not installed: Piper voices are not cut before their decoder")
            return None
        _store(where, split, source=source)
        _forget_older_cuts(where, source)
    meta = json.loads((where / "cut.json").read_text(encoding="utf-8"))
    if not meta.get("cut"):
        return None
    return Halves(
        encoder=where / "encoder.onnx",
        decoder=where / "decoder.onnx",
        latent=str(meta["latent"]),
        handoff=tuple(str(name) for name in meta["handoff"]),
        pad_frames=int(meta["pad_frames"]),
    )


def _store(where: Path, split: SplitVoice | None, *, source: Path) -> None:
    """Write the halves (or that there are none) to ``where`` atomically: a
    concurrent writer's copy wins, a reader never sees half a cut."""
    where.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".cut-", dir=where.parent))
    try:
        meta: dict[str, object] = {"cut": split is not None, "source": str(source)}
        if split is not None:
            (staging / "encoder.onnx").write_bytes(split.encoder)
            (staging / "decoder.onnx").write_bytes(split.decoder)
            meta.update(latent=split.latent, handoff=split.handoff, pad_frames=split.pad_frames)
        (staging / "cut.json").write_text(json.dumps(meta), encoding="utf-8")
        if where.exists() and not (where / "cut.json").is_file():
            forget_cut(where)  # what an interrupted writer left, or a damaged cut
        with contextlib.suppress(OSError):  # another process stored it first
            os.replace(staging, where)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _forget_older_cuts(where: Path, source: Path) -> None:
    """Remove the cuts of earlier versions of the voice file at ``source`` (the
    file changed: each cut is as large as the voice, and none would be used
    again). Cuts of other files, even with the same name, are kept."""
    stem = where.name.rsplit("-", 1)[0]
    for other in where.parent.glob(f"{glob.escape(stem)}-*"):
        if other == where or other.name.rsplit("-", 1)[0] != stem:
            continue
        try:
            meta = json.loads((other / "cut.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue  # being written now, or not a cut: not ours to judge
        if isinstance(meta, dict) and meta.get("source") == str(source):
            _LOGGER.info("Piper voice %s changed: removing its earlier cut %s", source, other)
            forget_cut(other)


def forget_cut(where: Path) -> None:
    """Remove a stored cut (damaged: the next load cuts the voice again)."""
    with contextlib.suppress(OSError):
        (where / "cut.json").unlink()
    shutil.rmtree(where, ignore_errors=True)


def split_voice(path: Path) -> SplitVoice | None:
    """Cut the voice at ``path`` before its decoder; None where it has no such
    cut. Raises ImportError without the ``onnx`` package."""
    import onnx
    from onnx import utils

    model = onnx.load(str(path))
    graph = model.graph
    decoder_nodes = [node for node in graph.node if node.name.startswith(DECODER_PREFIX)]
    if not decoder_nodes or any(
        node.op_type not in _LOCAL_OPS | {"Constant"} for node in decoder_nodes
    ):
        return None
    made = {name for node in decoder_nodes for name in node.output}
    weights = {init.name for init in graph.initializer}
    handoff = list(
        dict.fromkeys(
            name
            for node in decoder_nodes
            for name in node.input
            if name and name not in made and name not in weights
        )
    )
    first = [node for node in decoder_nodes if node.op_type == "Conv"]
    if not first or first[0].input[0] not in handoff:
        return None
    latent = first[0].input[0]
    handoff.remove(latent)
    handoff.insert(0, latent)
    extractor = utils.Extractor(model)
    inputs = [value.name for value in graph.input]
    encoder = extractor.extract_model(inputs, handoff)
    decoder = extractor.extract_model(handoff, [graph.output[0].name])
    if any(node.op_type not in _LOCAL_OPS | _SHAPE_OPS for node in decoder.graph.node):
        return None
    return Halves(
        encoder=encoder.SerializeToString(),
        decoder=decoder.SerializeToString(),
        latent=latent,
        handoff=tuple(handoff),
        pad_frames=receptive_field_frames(decoder_nodes),
    )


def receptive_field_frames(nodes: Sequence[Any]) -> int:
    """Frames of latent context that bound every output sample's receptive field
    (an upper bound: parallel branches are summed, not maxed)."""
    from onnx import helper

    frames = 0.0
    upsampled = 1  # samples per latent frame at this point of the graph
    for node in nodes:
        if node.op_type not in ("Conv", "ConvTranspose"):
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        kernel = int(attrs.get("kernel_shape", [1])[-1])
        dilation = int(attrs.get("dilations", [1])[-1])
        stride = int(attrs.get("strides", [1])[-1])
        if node.op_type == "ConvTranspose":
            frames += kernel / (stride * upsampled)
            upsampled *= stride
        else:
            frames += (kernel - 1) * dilation / 2 / upsampled
    return int(np.ceil(frames)) + 1


PACE_RUNS = 5
"""Decoder runs :attr:`ChunkedDecoder.pace` is the median of: one stalled run
(a paused process, a burst of other work) does not move it; a lasting change
of load does, within three runs."""


class ChunkedDecoder:
    """Decodes spans of a latent sequence with ``pad_frames`` of context."""

    def __init__(self, session: Any, cut: CutVoice, hop: int) -> None:
        self.session = session
        self.latent = cut.latent
        self.pad = cut.pad_frames
        self.hop = hop
        self._paces: deque[float] = deque(maxlen=PACE_RUNS)
        self._paces_lock = threading.Lock()

    @property
    def pace(self) -> float | None:
        """Seconds this device takes to decode a latent frame: the median of
        the last :data:`PACE_RUNS` runs (None before the first), how long a
        span takes here under the load there is now."""
        with self._paces_lock:
            paces = sorted(self._paces)
        if not paces:
            return None
        middle = len(paces) // 2
        return paces[middle] if len(paces) % 2 else (paces[middle - 1] + paces[middle]) / 2

    @pace.setter
    def pace(self, value: float | None) -> None:
        """Start the runs over from ``value`` (None: from none)."""
        with self._paces_lock:
            self._paces.clear()
            if value is not None:
                self._paces.append(value)

    def first_span(self, frames: int, wanted: int, frame_s: float, *, sharing: int = 1) -> int:
        """Frames of a sentence's ``frames`` to decode on their own, so its audio
        starts sooner (0: decode it whole). At least ``wanted``; longer where
        the rest would not be decoded before the first span has played (a slow
        device): the rest's decode must fit in :data:`PLAYING_SHARE` of the
        first span's playing time, at this decoder's :attr:`pace` times
        ``sharing`` (the streams each run waits behind: runs are timed alone).
        0 where the rest is not three times the first (each cut decodes
        ``2 * pad`` frames more, and the sooner start is worth that only when
        the rest is long)."""
        if wanted <= 0:
            return 0
        span = wanted
        if (pace := self.pace) is not None and pace > 0:
            pace *= max(1, sharing)
            # pace * (frames - span + pad) <= PLAYING_SHARE * span * frame_s
            need = pace * (frames + self.pad) / (PLAYING_SHARE * frame_s + pace)
            span = max(span, int(np.ceil(need)))
        return span if frames >= 3 * span + 2 * self.pad else 0

    def decode(
        self, handoff: Mapping[str, np.ndarray], spans: Sequence[tuple[int, int]]
    ) -> Iterator[FloatAudio]:
        """The audio of each ``(start, end)`` frame span, in order."""
        latent = handoff[self.latent]
        frames = latent.shape[-1]
        for start, end in spans:
            lo, hi = max(0, start - self.pad), min(frames, end + self.pad)
            feed = dict(handoff)
            if (lo, hi) != (0, frames):
                feed[self.latent] = np.ascontiguousarray(latent[..., lo:hi])
            started = time.perf_counter()
            audio = np.asarray(self.session.run(None, feed)[0], dtype=np.float32).reshape(-1)
            with self._paces_lock:
                self._paces.append((time.perf_counter() - started) / (hi - lo))
            if len(audio) != (hi - lo) * self.hop:
                raise RuntimeError(
                    f"decoder gave {len(audio)} samples for {hi - lo} frames, not "
                    f"{self.hop} a frame"
                )
            offset = (start - lo) * self.hop
            yield audio[offset : offset + (end - start) * self.hop]

    def check(self, handoff: Mapping[str, np.ndarray]) -> float:
        """Largest difference between a whole and a two-span decode of a random
        latent shaped like ``handoff``'s (an encoder output; blocking, for load time)."""
        frames = 4 * self.pad + 8
        rng = np.random.default_rng(0)
        channels = handoff[self.latent].shape[1]
        latent = rng.standard_normal((1, channels, frames)).astype(np.float32)
        feed = {**handoff, self.latent: latent}
        whole = np.concatenate(list(self.decode(feed, [(0, frames)])))
        cut = frames // 3
        parts = np.concatenate(list(self.decode(feed, [(0, cut), (cut, frames)])))
        return float(np.max(np.abs(whole - parts)))
