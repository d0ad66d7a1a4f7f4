"""The ``edgevoice`` command line."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from edgevoice import __version__
from edgevoice.audio import AudioError, StreamEncoder, decode, format_for_path
from edgevoice.config import (
    ConfigError,
    Settings,
    config_source,
    effective_config_toml,
    load_config,
)
from edgevoice.daemon import Daemon, setup_logging
from edgevoice.engines.base import (
    EngineKind,
    EngineRequestError,
    SynthesizeOptions,
    TranscribeOptions,
)
from edgevoice.engines.registry import default_registry, validate_engines
from edgevoice.errors import EngineError, UnknownModelError
from edgevoice.hub import EngineHub, HubStartError
from edgevoice.memory import limit_malloc_arenas
from edgevoice.transcript_formats import TRANSCRIPT_FORMATS, format_transcript

_LOGGER = logging.getLogger(__name__)

# Errors a user can act on: printed as one line, no traceback.
_USER_ERRORS = (
    ConfigError,
    AudioError,
    HubStartError,
    UnknownModelError,
    EngineRequestError,
    EngineError,
    OSError,
)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edgevoice", description="Voice appliance daemon: ASR, TTS, wake word and VAD."
    )
    parser.add_argument("--version", action="version", version=f"edgevoice {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    def with_config(p: argparse.ArgumentParser) -> None:
        p.add_argument("--config", type=Path, help="config file (TOML)")
        p.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"])

    serve = sub.add_parser("serve", help="run the daemon")
    with_config(serve)

    tr = sub.add_parser("transcribe", help="transcribe an audio file to stdout")
    with_config(tr)
    tr.add_argument("file", type=Path)
    tr.add_argument("--model", help="configured ASR model name (default: the default one)")
    tr.add_argument("--language", help="ISO 639-1 code; detected when omitted")
    tr.add_argument("--task", choices=["transcribe", "translate"], default="transcribe")
    tr.add_argument("--format", choices=TRANSCRIPT_FORMATS, default="text")
    tr.add_argument("--prompt", help="initial prompt: vocabulary or preceding text")
    tr.add_argument("--hotwords", help="words to favour (faster-whisper hotwords)")
    tr.add_argument("--beam-size", type=int)
    tr.add_argument("--word-timestamps", action="store_true")

    sp = sub.add_parser("speak", help="synthesize text to an audio file")
    with_config(sp)
    sp.add_argument("text", help="text to speak ('-' reads stdin)")
    sp.add_argument("--voice", help="configured voice name (default: the default one)")
    sp.add_argument("--speaker", help="speaker of a multi-speaker voice")
    sp.add_argument("--speed", type=float, default=1.0)
    sp.add_argument(
        "-o",
        "--output",
        type=Path,
        required=True,
        help="output file; format from extension: wav flac mp3 opus/ogg aac pcm",
    )

    eng = sub.add_parser("engines", help="list engine plugins")
    eng.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"])

    dev = sub.add_parser("devices", help="list sound devices ([audio_io] input/output)")
    dev.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"])

    check = sub.add_parser("check-config", help="validate a config and print the effective one")
    check.add_argument("path", nargs="?", type=Path)
    check.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"])

    voices = sub.add_parser("voices", help="manage the voice library")
    voices_sub = voices.add_subparsers(dest="voices_command", required=True)
    vimport = voices_sub.add_parser(
        "import",
        help="store a Fish Speech ref_data/SPEAKER/EMOTION/*.wav|.lab tree "
        "(each speaker a voice, its emotions styles of it)",
    )
    vimport.add_argument("dir", type=Path, help="the ref_data directory")
    with_config(vimport)

    inst = sub.add_parser(
        "install-service",
        help="install the systemd service (launchd on macOS): user, directories, config, unit",
    )
    inst.add_argument("--user", default="edgevoice", help="account the service runs as")
    inst.add_argument(
        "--prefix", type=Path, help="Python environment to run (default: this one, sys.prefix)"
    )
    inst.add_argument("--dry-run", action="store_true", help="print the steps, change nothing")
    inst.add_argument("--no-start", action="store_true", help="do not enable/start the service")
    inst.add_argument(
        "--root", type=Path, help="stage files under this directory (packaging); no user/systemctl"
    )
    return parser


def _settings(args: argparse.Namespace) -> Settings:
    settings = load_config(getattr(args, "config", None))
    level = args.log_level or settings.log_level
    setup_logging(level)
    return settings


def _model_name(settings: Settings, kind: EngineKind, requested: str | None) -> list[str] | None:
    if requested:
        return [requested]
    entries = settings.models(kind)
    if not entries:
        raise ConfigError(f"no {kind.value} model is configured")
    default = next((e for e in entries if e.default), entries[0])
    return [default.name]


async def _transcribe(args: argparse.Namespace, settings: Settings) -> None:
    if args.beam_size is not None and args.beam_size < 1:
        raise ConfigError("--beam-size must be at least 1")
    audio = await asyncio.to_thread(decode, args.file)
    only: dict[EngineKind, list[str] | None] = {
        EngineKind.ASR: _model_name(settings, EngineKind.ASR, args.model)
    }
    async with EngineHub(settings, only=only) as hub:
        options = TranscribeOptions(
            language=args.language,
            task=args.task,
            prompt=args.prompt,
            hotwords=args.hotwords,
            beam_size=args.beam_size,
            word_timestamps=args.word_timestamps or args.format == "verbose_json",
        )
        transcript = await hub.transcribe(audio, options, model=args.model)
    out = format_transcript(transcript, args.format, args.task)
    sys.stdout.write(out if out.endswith("\n") else out + "\n")


async def _speak(args: argparse.Namespace, settings: Settings) -> None:
    text = sys.stdin.read() if args.text == "-" else args.text
    if not text.strip():
        raise EngineRequestError("nothing to say: the text is empty")
    fmt = format_for_path(args.output)
    only: dict[EngineKind, list[str] | None] = {
        EngineKind.TTS: _model_name(settings, EngineKind.TTS, args.voice)
    }
    async with EngineHub(settings, only=only) as hub:
        options = SynthesizeOptions(voice=args.voice, speaker=args.speaker, speed=args.speed)
        _model, rate, chunks = await hub.synthesize(text, options)
        encoder = StreamEncoder(fmt, rate)
        partial = args.output.with_name(args.output.name + ".partial")
        try:
            with partial.open("wb") as out:
                async for chunk in chunks:
                    out.write(encoder.write(chunk))
                out.write(encoder.close())
            partial.replace(args.output)
        finally:
            partial.unlink(missing_ok=True)
    _LOGGER.info("Wrote %s", args.output)


def _engines() -> None:
    """One row per engine: installed or what is missing, the devices it supports,
    and those it can use on this machine (its runtime probed once)."""
    from edgevoice.devices import MachineFacts, probe_machine, usable_devices

    registry = default_registry()
    facts: dict[str | None, MachineFacts] = {}
    rows = []
    for status in registry.statuses():
        plugin = status.plugin
        if plugin is None:
            rows.append(
                (status.entry_point, "?", "broken", "-", "-", status.source, status.error or "")
            )
            continue
        state = "installed" if status.available else "missing: " + ", ".join(status.missing)
        here = "-"
        if status.available:
            if plugin.runtime not in facts:
                facts[plugin.runtime] = probe_machine(plugin.runtime)
            here = ",".join(usable_devices(plugin.devices, facts[plugin.runtime])) or "none"
        rows.append(
            (
                plugin.name,
                plugin.kind.value,
                state,
                ",".join(plugin.devices),
                here,
                plugin.install_hint(),
                plugin.description,
            )
        )
    header = ("ENGINE", "KIND", "STATUS", "DEVICES", "USABLE HERE", "INSTALL", "DESCRIPTION")
    widths = [max(len(str(r[i])) for r in (header, *rows)) for i in range(6)]
    for row in (header, *rows):
        cells = [str(c).ljust(widths[i]) for i, c in enumerate(row[:6])]
        print("  ".join([*cells, row[6]]).rstrip())


def _devices() -> int:
    """Print the PortAudio devices (``[audio_io] input``/``output`` take an index,
    a name or a part of one); 1 when PortAudio is missing."""
    from edgevoice.audio_io.devices import AudioDeviceError, list_devices

    try:
        devices = list_devices()
    except AudioDeviceError as exc:
        print(f"edgevoice: error: {exc}", file=sys.stderr)
        return 1
    if not devices:
        print("no sound devices found (file:PATH devices still work)")
        return 0
    print("INDEX   IN  OUT   RATE  HOST API    NAME")
    for d in devices:
        mark = (" <default in" if d.default_input else "") + (
            " <default out" if d.default_output else ""
        )
        print(
            f"{d.index:>5}  {d.max_input_channels:>3}  {d.max_output_channels:>3}  "
            f"{d.default_rate_hz:>5}  {d.host_api[:10]:<10}  {d.name}{mark}"
        )
    return 0


def _voices_import(args: argparse.Namespace, settings: Settings) -> int:
    """``voices import DIR``: each SPEAKER a voice, each EMOTION a style of it (stored as the
    voice ``SPEAKER/EMOTION``); 1 if any failed."""
    from edgevoice.protocols.http.fish import import_ref_data
    from edgevoice.voices import VoiceLibrary

    limits = settings.limits
    library = VoiceLibrary(
        settings.state_dir / "voices",
        max_voices=limits.max_voices,
        max_bytes=limits.max_voice_library_bytes,
    )
    failed = 0
    for result in import_ref_data(library, args.dir):
        if result.voice_id is None:
            failed += 1
            print(f"{result.name}: not imported: {result.error}", file=sys.stderr)
        else:
            print(
                f"{result.name} -> {result.voice_id}{' (already stored)' if result.existed else ''}"
            )
    return 1 if failed else 0


def _check_config(args: argparse.Namespace) -> None:
    settings = load_config(args.path)
    validate_engines(settings)
    source = config_source(settings)
    print(f"# effective configuration (source: {source or 'built-in defaults'}; secrets redacted)")
    print(effective_config_toml(settings), end="")


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "engines":
            setup_logging(args.log_level or "WARNING")
            _engines()
        elif args.command == "devices":
            setup_logging(args.log_level or "WARNING")
            return _devices()
        elif args.command == "check-config":
            setup_logging(args.log_level or "WARNING")
            _check_config(args)
        elif args.command == "install-service":
            from edgevoice.service import InstallError, install_service

            try:
                install_service(
                    args.user,
                    args.prefix,
                    dry_run=args.dry_run,
                    root=args.root,
                    start=not args.no_start,
                )
            except InstallError as exc:
                print(f"edgevoice: error: {exc}", file=sys.stderr)
                return 1
        else:
            settings = _settings(args)
            if args.command == "serve":
                limit_malloc_arenas()
                try:
                    asyncio.run(Daemon(settings).run())
                except asyncio.CancelledError:  # a second SIGTERM/SIGINT: stopped at once
                    return 1
            elif args.command == "transcribe":
                asyncio.run(_transcribe(args, settings))
            elif args.command == "speak":
                asyncio.run(_speak(args, settings))
            elif args.command == "voices":
                return _voices_import(args, settings)
    except _USER_ERRORS as exc:
        print(f"edgevoice: error: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, ConfigError) else 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
