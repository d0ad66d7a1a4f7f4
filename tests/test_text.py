from __future__ import annotations

from edgevoice.text import SentenceBuffer, split_for_streaming, split_sentences


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
