"""Text helpers for streaming TTS: sentence splitting, incremental buffering."""

from __future__ import annotations

import re
from collections.abc import Iterator

# A sentence ends at . ! ? … (and their CJK full-width forms) followed by whitespace or the end,
# unless the period belongs to a common abbreviation or a number like 3.5.
_SENTENCE_END = re.compile(r"(?<=[.!?…。！？])[\"')\]]*(?:\s+|$)")
_ABBREVIATIONS = frozenset(
    """mr mrs ms dr prof sr jr st vs etc e.g i.e approx no dept est fig inc ltd co corp""".split()
)
_CLAUSE_BREAK = re.compile(r"(?<=[,;:—–])\s+")


def _ends_with_abbreviation(text: str) -> bool:
    match = re.search(r"(\S+)\.$", text.rstrip())
    if not match:
        return False
    word = match.group(1).lower().lstrip("(\"'")
    return word in _ABBREVIATIONS or (len(word) == 1 and word.isalpha())


def split_sentences(text: str) -> list[str]:
    """Split text into sentences, keeping punctuation; whitespace is normalised."""
    sentences: list[str] = []
    start = 0
    for match in _SENTENCE_END.finditer(text):
        candidate = text[start : match.end()].strip()
        if not candidate:
            continue
        if _ends_with_abbreviation(candidate) and match.end() < len(text):
            continue
        sentences.append(" ".join(candidate.split()))
        start = match.end()
    rest = " ".join(text[start:].split())
    if rest:
        sentences.append(rest)
    return sentences


def split_for_streaming(text: str, first_clause_chars: int = 80, lead_words: int = 0) -> list[str]:
    """Sentences, with the *first* one cut so the first audio chunk is ready sooner.

    A first sentence longer than ``first_clause_chars`` is split at its first
    clause break. Then, with ``lead_words`` > 0, a first piece of at least
    ``lead_words + 4`` words has its first ``lead_words`` words split off as a
    short lead chunk (faster first audio, at the cost of a little prosody at
    that one boundary).
    """
    sentences = split_sentences(text)
    if sentences and len(sentences[0]) > first_clause_chars:
        parts = _CLAUSE_BREAK.split(sentences[0], maxsplit=1)
        if len(parts) == 2 and len(parts[0]) >= 12:
            sentences[0:1] = parts
    if sentences and lead_words > 0:
        first_words = sentences[0].split()
        if len(first_words) >= lead_words + 4:
            sentences[0:1] = [
                " ".join(first_words[:lead_words]),
                " ".join(first_words[lead_words:]),
            ]
    return sentences


class SentenceBuffer:
    """Collects text arriving in pieces (LLM tokens) and releases whole sentences."""

    def __init__(self) -> None:
        self._pending = ""

    def feed(self, chunk: str) -> Iterator[str]:
        """Add ``chunk``; yield every sentence now complete."""
        self._pending += chunk
        sentences = split_sentences(self._pending)
        if not sentences:
            return
        # The last piece is complete only if the buffer ends right after its
        # terminator and whitespace; otherwise more words may follow.
        tail_complete = bool(re.search(r"[.!?…。！？][\"')\]]*\s+$", self._pending))
        complete = sentences if tail_complete else sentences[:-1]
        if tail_complete and _ends_with_abbreviation(sentences[-1]):
            complete = sentences[:-1]
        if not complete:
            return
        consumed = self._pending
        yield from complete
        # Keep whatever was not released, preserving its original text.
        remainder = sentences[len(complete) :]
        self._pending = " ".join(remainder) + (" " if remainder and consumed.endswith(" ") else "")

    def flush(self) -> Iterator[str]:
        """Yield what is left (end of input)."""
        text, self._pending = self._pending, ""
        yield from split_sentences(text)
