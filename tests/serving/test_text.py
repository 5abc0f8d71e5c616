"""Incremental detokenisation and stop strings (serving/text.py), without a model: the text sent equals
a full decode, stop strings cut where a full-text search would, and held-back text is released."""

from __future__ import annotations

import random

import pytest
from tokenizers import Tokenizer, decoders, models

from dsla_serve.serving.text import MAX_PENDING, StopMatcher, TextStream, backend_of


@pytest.fixture(scope="module")
def backend(tokenizer) -> Tokenizer:
    return backend_of(tokenizer)


def run(stream: TextStream, ids: list[int]) -> tuple[str, bool]:
    pieces, stopped = [], False
    for t in ids:
        piece, stopped = stream.push(t)
        pieces.append(piece)
        if stopped:
            break
    return "".join(pieces) + stream.flush(), stopped


def test_streamed_text_equals_a_full_decode(tokenizer, backend):
    """Random token ids over the whole vocabulary: partial UTF-8 characters, special tokens (skipped)."""
    rng = random.Random(0)
    for _ in range(50):
        ids = [rng.randrange(len(tokenizer)) for _ in range(40)]
        text, stopped = run(TextStream(backend, []), ids)
        assert not stopped and text == tokenizer.decode(ids, skip_special_tokens=True)
    ids = tokenizer("Café ☕ — naïve 日本語 🎉 text", add_special_tokens=False).input_ids
    assert run(TextStream(backend, []), ids)[0] == "Café ☕ — naïve 日本語 🎉 text"


def first_stop(text: str, stops: list[str]) -> str:
    """Reference: cut at the stop string that is completed first (ties: the one that starts first)."""
    ends = [(text.find(s) + len(s), -len(s), s) for s in stops if s in text]
    if not ends:
        return text
    end, neg_len, _ = min(ends)
    return text[: end + neg_len]


def test_stop_strings_cut_where_the_full_text_search_does(tokenizer, backend):
    text = "The keeper wrote: the storm is over. The harbour is calm; the ships are in."
    ids = tokenizer(text, add_special_tokens=False).input_ids
    for stops in (["storm"], ["calm", "over"], ["is"], ["nowhere"], ["ships are in.", "harbour"], ["r.", "over. T"]):
        out, stopped = run(TextStream(backend, stops), ids)
        assert out == first_stop(text, stops) and stopped == (out != text), stops


def test_stop_matcher_agrees_with_a_brute_force_search():
    """KMP over random strings of a small alphabet (many partial matches and restarts)."""
    rng = random.Random(1)
    for _ in range(300):
        stop = "".join(rng.choice("ab") for _ in range(rng.randint(1, 6)))
        text = "".join(rng.choice("ab") for _ in range(30))
        m = StopMatcher(stop)
        hits = [i for i, c in enumerate(text) if m.feed(c)]
        assert hits[:1] == ([text.find(stop) + len(stop) - 1] if stop in text else []), (stop, text)


def test_a_partial_stop_string_is_held_back_then_released(tokenizer, backend):
    stream = TextStream(backend, ["END!"])
    sent = ""
    for word in ["Once", " upon", " EN", "D", " time"]:  # "END" then " time": never "END!"
        for t in tokenizer(word, add_special_tokens=False).input_ids:
            piece, stopped = stream.push(t)
            sent += piece
            assert not stopped
        if word in (" EN", "D"):
            assert not sent.endswith(("E", "EN", "END"))  # could still become "END!": held
    assert sent + stream.flush() == "Once upon END time"
    stream = TextStream(backend, ["END!"])
    for t in tokenizer("a tale that ends at END", add_special_tokens=False).input_ids:
        stream.push(t)
    assert stream.flush() == "END"  # held to the end, then sent: it never became a stop string


def test_long_stop_string_is_linear_and_exact(backend, tokenizer):
    """A 256-character stop string over text that keeps almost matching it."""
    stop = "ab" * 127 + "c!"
    text = "ab" * 400 + "c!" + " after"
    ids = tokenizer(text, add_special_tokens=False).input_ids
    out, stopped = run(TextStream(backend, [stop]), ids)
    assert stopped and out == text[: text.index(stop)]


def byte_fallback_tokenizer() -> Tokenizer:
    """A tiny Llama-style tokenizer whose decoder is not monotonic (byte fallback), as in vLLM issue 17448."""
    vocab = {"<unk>": 0, "<0xE2>": 1, "<0x82>": 2, "<0xAC>": 3, "a": 4, "▁": 5, "▁b": 6}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True))
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    return tok


def test_decoder_errors_on_a_non_monotonic_prefix_restart_the_stream():
    tok = byte_fallback_tokenizer()
    stream = TextStream(tok, [])
    pieces = [stream.push(t)[0] for t in (1, 2, 2, 1, 4)]  # E2 82 82 = "₂", then E2 + "a": the window changes
    assert "".join(pieces) + stream.flush() == "₂�a"


def test_bytes_that_never_form_a_character_are_sent_after_a_bounded_wait():
    tok = byte_fallback_tokenizer()
    stream = TextStream(tok, [])
    sent = ""
    for _ in range(3 * MAX_PENDING):
        sent += stream.push(2)[0]  # lone continuation bytes
        assert len(stream.pending) < MAX_PENDING  # the decoder never re-reads more than this
    assert sent + stream.flush() == "�" * (3 * MAX_PENDING)


def test_a_tokenizer_without_a_fast_backend_is_refused_by_name():
    with pytest.raises(ValueError, match=r"tokenizer\.json"):
        backend_of(object())
