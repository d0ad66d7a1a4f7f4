from __future__ import annotations

import pytest

from edgevoice.errors import LimitExceededError
from edgevoice.text import SentenceBuffer, cut_long, split_for_streaming, split_sentences


def test_split_sentences_keeps_punctuation_and_abbreviations() -> None:
    text = "Hello there!  Dr. Smith paid $3.50 today. Is it done? Yes…  ok"
    assert split_sentences(text) == [
        "Hello there!",
        "Dr. Smith paid $3.50 today.",
        "Is it done?",
        "Yes…",
        "ok",
    ]


def test_split_for_streaming_splits_long_first_sentence_at_clause() -> None:
    text = (
        "When the first sentence of a paragraph is very long, with several clauses, "
        "the first audio should not wait for all of it. Short one."
    )
    parts = split_for_streaming(text)
    assert parts[0] == "When the first sentence of a paragraph is very long,"
    assert parts[-1] == "Short one."
    assert " ".join(parts) == " ".join(text.split())


def test_sentence_buffer_releases_complete_sentences_only() -> None:
    buf = SentenceBuffer()
    out: list[str] = []
    for token in ["Hel", "lo world", ". How", " are", " you? I am", " fine", "."]:
        out.extend(buf.feed(token))
    assert out == ["Hello world.", "How are you?"]
    assert list(buf.flush()) == ["I am fine."]
    assert list(buf.flush()) == []


def test_sentence_buffer_waits_after_abbreviation() -> None:
    buf = SentenceBuffer()
    assert list(buf.feed("Call Dr. ")) == []
    assert list(buf.feed("Smith now. ")) == ["Call Dr. Smith now."]


def test_split_for_streaming_lead_words() -> None:
    text = "The weather today is sunny with a light breeze. Later it rains."
    assert split_for_streaming(text, lead_words=3) == [
        "The weather today",
        "is sunny with a light breeze.",
        "Later it rains.",
    ]
    # Too short to be worth a lead chunk; and 0 disables it.
    assert split_for_streaming("Turn on the lamp.", lead_words=3) == ["Turn on the lamp."]
    assert split_for_streaming(text) == [
        "The weather today is sunny with a light breeze.",
        "Later it rains.",
    ]


# ------------------------------------------------------------ bounded pieces


def test_cut_long_prefers_clause_then_word_then_hard_cut() -> None:
    clauses = (
        "When the first sentence of a paragraph is very long, with several clauses; "
        "the first audio should not wait for all of it — really not"
    )
    pieces = cut_long(clauses, 60)
    assert pieces[0].endswith(",") and pieces[1].endswith(";")
    assert all(len(p) <= 60 for p in pieces)
    assert " ".join(pieces) == clauses
    words = " ".join(["alpha"] * 40)
    assert all(len(p) <= 50 and not p.startswith(" ") for p in cut_long(words, 50))
    assert " ".join(cut_long(words, 50)) == words
    assert cut_long("x" * 250, 100) == ["x" * 100, "x" * 100, "x" * 50]


def test_a_megabyte_of_unpunctuated_text_is_cut_into_bounded_pieces() -> None:
    megabyte = "word " * 209716
    pieces = split_sentences(megabyte, 300)
    assert all(0 < len(p) <= 300 for p in pieces)
    assert sum(len(p.split()) for p in pieces) == 209716
    solid = split_sentences("x" * 1_048_576, 300)
    assert all(len(p) <= 300 for p in solid) and sum(map(len, solid)) == 1_048_576
    # Abbreviation look-back is one word, not the whole text ("Dr. Dr. Dr. ...").
    doctors = split_sentences("Dr. " * 100_000, 300)
    assert all(len(p) <= 300 for p in doctors)


def test_split_for_streaming_bounds_every_piece() -> None:
    text = (
        "First comes a rather short little sentence. "
        + " ".join(["unpunctuated"] * 100)
        + ". Last."
    )
    parts = split_for_streaming(text, lead_words=3, max_chars=80)
    assert all(len(p) <= 80 for p in parts)
    assert parts[:2] == ["First comes a", "rather short little sentence."] and parts[-1] == "Last."
    assert " ".join(parts) == " ".join(text.split())


def test_sentence_buffer_holds_a_bounded_tail_of_endless_text() -> None:
    """The issue's 20 000 ``synthesize-chunk "word "``: pieces leave as soon as
    a sentence would exceed the bound, so each feed scans a bounded text."""
    buf = SentenceBuffer(max_sentence_chars=300, max_pending_chars=4096)
    out: list[str] = []
    most_pending = 0
    for _ in range(20000):
        out.extend(buf.feed("word "))
        most_pending = max(most_pending, buf.pending_chars)
    out.extend(buf.flush())
    assert most_pending <= 300 + len("word ")
    assert all(len(p) <= 300 for p in out)
    assert sum(len(p.split()) for p in out) == 20000


def test_sentence_buffer_refuses_a_chunk_over_the_pending_limit() -> None:
    buf = SentenceBuffer(max_pending_chars=4096)
    assert buf.feed("Almost") == []
    with pytest.raises(LimitExceededError, match="max_input_chars"):
        buf.feed("x" * 4096)
    assert buf.pending_chars == len("Almost")  # the refused chunk left no trace
    assert buf.flush() == ["Almost"]


def test_sentence_buffer_waits_for_whitespace_after_a_terminator() -> None:
    buf = SentenceBuffer()
    assert buf.feed("It costs 3.") == []
    assert buf.feed('50 today. He said "hi.') == ["It costs 3.50 today."]
    assert buf.feed('"') == []
    assert buf.feed("\nThen\tleft") == ['He said "hi."']
    assert buf.flush() == ["Then left"]


def test_sentence_buffer_full_width_terminators_need_no_space() -> None:
    buf = SentenceBuffer()
    assert buf.feed("这是第一句。这是第二句") == ["这是第一句。"]
    assert buf.feed("。") == []  # a closing quote may still follow
    assert buf.feed("」好") == ["这是第二句。」"]
    assert buf.flush() == ["好"]
