"""``python -m bench`` runs one tiny round and writes its table.

edgevoice against the peers when their venv exists (/tmp/bench-venv, see
bench/__main__.py), else edgevoice alone (the table says so). Nothing here
asserts a speed: only that every measure was taken and the table written.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO

PEER_PYTHON = "/tmp/bench-venv/bin/python"
TIMEOUT_S = 600


def test_one_quick_round_writes_the_table(tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    readme.write_text("# edgevoice\n\nText before.\n", encoding="utf-8")
    peers = os.path.exists(PEER_PYTHON)
    argv = [sys.executable, "-m", "bench", "--rounds", "1", "--quick", "--readme", str(readme)]
    if not peers:
        argv.append("--ours-only")
    done = subprocess.run(
        argv, cwd=REPO, capture_output=True, text=True, timeout=TIMEOUT_S, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    text = readme.read_text(encoding="utf-8")
    assert text.startswith("# edgevoice\n\nText before.\n")
    assert "<!-- bench:begin -->" in text and "<!-- bench:end -->" in text
    for measure in (
        "unpaced + 0.5 s silence, total",
        "push-to-talk (unpaced, no silence), total",
        "paced, no silence, after stop",
        "paced + 0.7 s silence, after stop",
        "HA turn: end of speech -> transcript",
        "TTS plain: first audio",
        "TTS streaming: total",
        "4-client ASR throughput (audio s/s)",
        "describe p99 while busy",
        "RSS (MB)",
        "cold start (s)",
        "word error rate",
    ):
        assert f"| {measure}" in text, (measure, text)
    if peers:
        assert "wyoming-faster-whisper 3.8.1" in text
        # Every row has a ratio when the peers ran.
        rows = [line for line in text.splitlines() if line.startswith("| ") and "|---" not in line]
        assert all(line.split("|")[4].strip() for line in rows[1:-1]), rows
    else:
        assert "peers not run" in text
    # A second run replaces the block instead of adding one.
    from bench.__main__ import write_readme

    write_readme(readme, "again\n")
    assert readme.read_text(encoding="utf-8").count("<!-- bench:begin -->") == 1
