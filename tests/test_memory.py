"""What keeps the daemon's memory small (edgevoice.memory): PyAV deferred until a
compressed upload needs it, freed heap returned, malloc arenas capped. Each check
runs in a fresh interpreter: the test process has imported everything already."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import HOTWORDS_MP3, REPO

_DEFERRED_AV = """
import json, sys, threading
from pathlib import Path

from edgevoice.config import ModelConfig
from edgevoice.engines.base import EngineContext, TranscribeOptions
from edgevoice.engines.faster_whisper import FasterWhisperAsrEngine, FasterWhisperOptions
from edgevoice.memory import is_loaded, return_freed_memory
from edgevoice.testing import tone

out = {}
entry = ModelConfig(name="tiny", engine="faster-whisper", model="tiny.en")
engine = FasterWhisperAsrEngine(
    EngineContext(model=entry, device="cpu", cache_dir=Path(sys.argv[2]), offline=True),
    FasterWhisperOptions(),
)
engine.load()
_info, segments = engine.transcribe(tone(1.0), TranscribeOptions())
list(segments)
out["after_load_and_decode"] = is_loaded("av")

from edgevoice.audio import decode
results = []
def work():
    results.append(len(decode(Path(sys.argv[1]).read_bytes(), rate_hz=16000).samples))
threads = [threading.Thread(target=work) for _ in range(4)]
for t in threads:
    t.start()
for t in threads:
    t.join()
out["decoded"] = results
out["after_upload"] = is_loaded("av")
import av
out["real_module"] = hasattr(av, "open") and type(av).__name__ == "module"
return_freed_memory()
print(json.dumps(out))
"""


def _python(code: str, *args: str, env: dict[str, str] | None = None) -> dict[str, object]:
    done = subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        check=False,
        cwd=REPO,
        env=env,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result: dict[str, object] = json.loads(done.stdout.splitlines()[-1])
    return result


def test_pyav_loads_only_when_a_compressed_upload_needs_it(tmp_path: Path) -> None:
    """faster-whisper imports PyAV (FFmpeg, ~16 MB resident) at import time; the
    engine defers it, so a daemon that is never sent a compressed file never pays.
    Four threads decoding at once complete the deferred import once."""
    out = _python(_DEFERRED_AV, str(HOTWORDS_MP3), str(tmp_path))
    assert out["after_load_and_decode"] is False
    assert out["after_upload"] is True and out["real_module"] is True
    decoded = out["decoded"]
    assert isinstance(decoded, list) and len(set(decoded)) == 1 and decoded[0] > 16000


_ARENAS = """
import json
from edgevoice.memory import limit_malloc_arenas
print(json.dumps({"limited": limit_malloc_arenas()}))
"""


def test_malloc_arenas_are_capped_unless_the_environment_decides() -> None:
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_ARENA_MAX"}
    assert _python(_ARENAS, env=env)["limited"] is True
    assert _python(_ARENAS, env={**env, "MALLOC_ARENA_MAX": "4"})["limited"] is False
