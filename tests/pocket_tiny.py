"""A Pocket TTS model with random weights, built from the config the package ships.

No Pocket TTS weights install offline: the config ``english_2m_2026-10`` with
its Mimi encoder shrunk, the weight paths set to null, a sentencepiece
tokenizer trained here on a few sentences and ``n_bins`` = its vocabulary
size. Shared by the engine's tests and the compatible APIs' tests.
"""

from __future__ import annotations

import io
from pathlib import Path

RATE_HZ = 24000
FRAME_SAMPLES = 1920
"""Samples per generated latent frame (24 kHz at 12.5 frames/s)."""
MIN_FRAMES = 6
"""Pocket TTS ignores end-of-speech before its 6th frame."""

_SENTENCES = [
    "Turn on the living room lamp.",
    "Hello there, this is a tiny test model speaking.",
    "The quick brown fox jumps over the lazy dog.",
    "Good morning! How are you today?",
    "She sells sea shells by the sea shore; numbers 0 1 2 3 4 5 6 7 8 9.",
]


def max_samples(text: str) -> int:
    """Most samples Pocket TTS may generate for ``text`` with any weights.

    Each piece's generation is capped at (tokens / 3 + 2) s of frames; a
    sentencepiece token covers at least one character, and preparing a piece
    adds at most a few (capital, final punctuation, padding).
    """
    tokens = len(text) + 8
    return (int((tokens / 3 + 2) * 12.5) + 2) * FRAME_SAMPLES


def build_tiny_model(root: Path) -> Path:
    """A Pocket TTS config with random weights and a locally trained tokenizer."""
    import sentencepiece as spm
    import yaml
    from pocket_tts.utils.config import CONFIGS_DIR

    root.mkdir(parents=True, exist_ok=True)
    trained = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_SENTENCES * 20),
        model_writer=trained,
        vocab_size=64,
        character_coverage=1.0,
        hard_vocab_limit=False,
        minloglevel=2,
    )
    (root / "tokenizer.model").write_bytes(trained.getvalue())
    vocab = spm.SentencePieceProcessor(model_proto=trained.getvalue()).vocab_size()
    config = yaml.safe_load((CONFIGS_DIR / "english_2m_2026-10.yaml").read_text())
    config["weights_path"] = None
    config["weights_path_without_voice_cloning"] = None
    table = config["flow_lm"]["lookup_table"]
    table["tokenizer_path"] = "tokenizer.model"  # relative to the config file
    table["n_bins"] = vocab
    mimi = config["mimi"]
    mimi["seanet"].update(dimension=64, n_filters=8)
    mimi["transformer"].update(
        d_model=64,
        input_dimension=64,
        output_dimensions=[64],
        dim_feedforward=128,
        num_heads=4,
        num_layers=1,
    )
    path = root / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    return path
