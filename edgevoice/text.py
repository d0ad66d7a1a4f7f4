"""Text helpers for TTS: sentence splitting, bounded pieces, incremental buffering.

Every function here is linear in its input: long or unpunctuated text is cut
into pieces of at most ``max_chars`` characters (at a clause break, else a
word break, else a hard cut), each step scanning only a bounded window, so a
megabyte of text costs milliseconds and no piece an engine receives is
unbounded. Pure functions, no I/O; safe on the event loop for input bounded
by ``[limits] max_input_chars`` (call them in a worker for more).
"""

from __future__ import annotations

import re
from typing import Final

from edgevoice.errors import LimitExceededError

DEFAULT_MAX_CHARS: Final = 300
"""Longest piece when the caller names no bound (``[limits] max_sentence_chars``)."""

_TERMINATORS: Final = ".!?…。！？"
_CLOSERS: Final = "\"')]»”’」』"
# A sentence ends at . ! ? … followed by optional closing quotes/brackets and
# whitespace (or the end of the text); the full-width CJK forms need no space.
_SENTENCE_END = re.compile(r"(?:(?<=[.!?…])[\"')\]»”’]*(?:\s+|$))|(?:(?<=[。！？])[」』”’)]*\s*)")
# The same, but only where whitespace proves the sentence is complete: text
# that stops right after a period may continue ("3." + "50").
_SENTENCE_END_STREAMING = re.compile(
    r"(?:(?<=[.!?…])[\"')\]»”’]*\s+)|(?:(?<=[。！？])[」』”’)]*+\s*(?=[\s\S]))"
)
# Chunks' line breaks and tabs become spaces, so one kind of space marks words.
_SPACES: Final = str.maketrans("\t\n\r\x0b\x0c", "     ")
_ABBREVIATIONS: Final = frozenset(
    """mr mrs ms dr prof sr jr st vs etc e.g i.e approx no dept est fig inc ltd co corp""".split()
)
# Where a long sentence may be cut, best first in each window: after clause
# punctuation (the mark stays with the left piece).
_CLAUSE_MARKS: Final = (", ", "; ", ": ", " — ", " – ", "—", "–", "，", "、", "；", "：")
_CLAUSE_BREAK = re.compile(r"(?<=[,;:—–])\s+")


def _abbreviation_before(text: str, pos: int, start: int = 0) -> bool:
    """Whether the period just before ``pos`` ends an abbreviation (``Dr.``, ``e.g.``,
    an initial). Looks back over one word only; words are separated by spaces."""
    if pos < 1 or text[pos - 1] != ".":
        return False
    space = text.rfind(" ", start, pos - 1)
    word = text[space + 1 if space >= 0 else start : pos - 1].lower().lstrip("(\"'")
    return word in _ABBREVIATIONS or (len(word) == 1 and word.isalpha())


def _normalize(text: str) -> str:
    return " ".join(text.split())


def _piece_end(text: str, start: int, max_chars: int) -> int:
    """Where the piece starting at ``start`` ends, for ``len(text) - start > max_chars``.

    A clause break, else a word break, else a hard cut at ``max_chars``; breaks
    in the first third of the window are ignored so every step advances at
    least ``max_chars // 3`` (which keeps the whole cut linear).
    """
    end = start + max_chars
    low = start + max(1, max_chars // 3)
    best = -1
    for mark in _CLAUSE_MARKS:
        found = text.rfind(mark, low, end + 1)
        if found >= 0:
            best = max(best, found + len(mark.rstrip()))
    if best > low:
        return min(best, end)
    space = text.rfind(" ", low, end + 1)
    return space if space > 0 else end


def cut_long(text: str, max_chars: int = DEFAULT_MAX_CHARS) -> list[str]:
    """Cut normalized text into pieces of at most ``max_chars`` characters.

    At clause punctuation (``, ; : — …``) where there is one in reach, else at
    a space, else mid-word. Linear in ``len(text)``.
    """
    if max_chars < 1:
        raise ValueError("max_chars must be at least 1")
    pieces: list[str] = []
    start, size = 0, len(text)
    while size - start > max_chars:
        end = _piece_end(text, start, max_chars)
        if piece := text[start:end].strip():
            pieces.append(piece)
        start = end
        while start < size and text[start] == " ":
            start += 1
    if rest := text[start:].strip():
        pieces.append(rest)
    return pieces


def split_sentences(text: str, max_chars: int | None = None) -> list[str]:
    """Split text into sentences, keeping punctuation; whitespace is normalised.

    With ``max_chars``, a sentence longer than that is cut further
    (:func:`cut_long`). Linear in ``len(text)``.
    """
    norm = _normalize(text)
    sentences: list[str] = []
    start = 0
    for match in _SENTENCE_END.finditer(norm):
        end = match.end()
        if end < len(norm) and _abbreviation_before(norm, match.start(), start):
            continue
        if candidate := norm[start:end].strip():
            sentences.append(candidate)
        start = end
    if rest := norm[start:].strip():
        sentences.append(rest)
    if max_chars is None:
        return sentences
    return [piece for sentence in sentences for piece in cut_long(sentence, max_chars)]


def split_for_streaming(
    text: str,
    first_clause_chars: int = 80,
    lead_words: int = 0,
    max_chars: int = DEFAULT_MAX_CHARS,
) -> list[str]:
    """Sentences of at most ``max_chars``, with the *first* one cut so the first
    audio chunk is ready sooner.

    A first sentence longer than ``first_clause_chars`` is split at its first
    clause break. Then, with ``lead_words`` > 0, a first piece of at least
    ``lead_words + 4`` words has its first ``lead_words`` words split off as a
    short lead chunk (faster first audio, at the cost of a little prosody at
    that one boundary).
    """
    sentences = split_sentences(text, max_chars)
    if sentences and len(sentences[0]) > first_clause_chars:
        parts = _CLAUSE_BREAK.split(sentences[0], maxsplit=1)
        if len(parts) == 2 and len(parts[0]) >= 12:
            sentences[0:1] = parts
    if sentences and lead_words > 0:
        first = sentences[0]
        # Only the first lead_words + 4 words matter: never split a long piece whole.
        head = first.split(" ", lead_words + 4)
        if len(head) >= lead_words + 4:
            cut = len(" ".join(head[:lead_words]))
            sentences[0:1] = [first[:cut], first[cut + 1 :]]
    return sentences


class SentenceBuffer:
    """Collects text arriving in pieces (LLM tokens) and releases whole sentences.

    Linear: each :meth:`feed` scans only the new text (plus a few characters
    before it), and the text held back never exceeds ``max_sentence_chars``
    plus one chunk, because a sentence growing past that bound is released in
    pieces cut at clause or word boundaries as soon as it is that long.
    ``max_pending_chars`` (``[limits] max_input_chars``) refuses a chunk that
    would make the held text longer than that, with :class:`LimitExceededError`.
    Not thread-safe; cheap enough to call on the event loop for bounded chunks.
    """

    def __init__(
        self,
        *,
        max_sentence_chars: int = DEFAULT_MAX_CHARS,
        max_pending_chars: int | None = None,
    ) -> None:
        if max_sentence_chars < 1:
            raise ValueError("max_sentence_chars must be at least 1")
        self.max_sentence_chars = max_sentence_chars
        self.max_pending_chars = max_pending_chars
        self._text = ""
        self._scan = 0
        """Offset in ``_text`` from which a sentence end may still be found."""

    @property
    def pending_chars(self) -> int:
        """Characters held back (not yet released as a sentence)."""
        return len(self._text)

    def feed(self, chunk: str) -> list[str]:
        """Add ``chunk``; return every sentence (or bounded piece) now complete."""
        limit = self.max_pending_chars
        if limit is not None and len(self._text) + len(chunk) > limit:
            raise LimitExceededError(
                "max_input_chars", limit, what="text waiting to be spoken", unit="characters"
            )
        if not chunk:
            return []
        text = self._text + chunk.translate(_SPACES)
        out: list[str] = []
        released = 0
        for match in _SENTENCE_END_STREAMING.finditer(text, self._scan):
            if _abbreviation_before(text, match.start(), released):
                continue
            out.extend(cut_long(_normalize(text[released : match.end()]), self.max_sentence_chars))
            released = match.end()
        # Too long without an end: release bounded pieces of its complete words.
        size = len(text)
        while size - released > self.max_sentence_chars:
            end = _piece_end(text, released, self.max_sentence_chars)
            if piece := _normalize(text[released:end]):
                out.append(piece)
            released = end
        self._text = text[released:]
        # The next sentence end can start no earlier than the trailing run of
        # terminators and closing quotes (they may still get their whitespace).
        scan = len(self._text)
        while scan > 0 and self._text[scan - 1] in _TERMINATORS + _CLOSERS:
            scan -= 1
        self._scan = scan
        return out

    def flush(self) -> list[str]:
        """Return what is left (end of input), in bounded pieces, and reset."""
        text, self._text, self._scan = self._text, "", 0
        return split_sentences(text, self.max_sentence_chars)
