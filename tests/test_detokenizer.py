"""Output in O(new tokens): incremental detokenisation and stop strings over streamed deltas."""

from __future__ import annotations

import random

import pytest

from deployments.responses import StopStrings
from models.engine.detokenizer import IncrementalDetokenizer
from models.loading import load_tokenizer
from tests.conftest import REPO

TOKENIZERS = [REPO / "models" / "bundled" / "tiny-code", REPO / "models" / "bundled" / "tiny-vlm"]


@pytest.mark.parametrize("folder", TOKENIZERS, ids=lambda p: p.name)
def test_streamed_text_equals_a_full_decode(folder):
    """Byte-level BPE (tokens that split UTF-8 characters) and word-level (spaces between tokens)."""
    tokenizer = load_tokenizer(folder)
    rng = random.Random(0)
    vocab = len(tokenizer)
    for trial in range(40):
        ids = [rng.randrange(vocab) for _ in range(rng.randrange(1, 60))]
        if trial % 2:  # real text with multi-byte characters, cut into tokens
            ids = tokenizer.encode("naïve café — ünïcödé ✓ 東京 def f(x):\n    return x", add_special_tokens=False)
        detok = IncrementalDetokenizer(tokenizer)
        text, i = "", 0
        while i < len(ids):
            step = rng.randrange(1, 4)
            text += detok.push(ids[i : i + step])
            i += step
        text += detok.flush()
        assert text == tokenizer.decode(ids, skip_special_tokens=True), (folder.name, ids)


def test_incomplete_characters_are_held_back():
    tokenizer = load_tokenizer(TOKENIZERS[0])
    ids = tokenizer.encode("東京", add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer)
    pieces = [detok.push([t]) for t in ids]
    assert all("\ufffd" not in p for p in pieces) and "".join(pieces) == "東京"


def feed_all(stops, chunks):
    checker = StopStrings(stops)
    sent = ""
    for i, chunk in enumerate(chunks):
        out, stopped = checker.feed(chunk, final=i == len(chunks) - 1)
        sent += out
        if stopped:
            return sent, True
    return sent, False


def test_stop_strings_across_chunks():
    assert feed_all(["\n\n"], ["def f():", "\n", "\n    pass"]) == ("def f():", True)
    assert feed_all(["END"], ["abc E", "N", "D tail"]) == ("abc ", True)
    assert feed_all(["END"], ["abc E", "N", "d tail"]) == ("abc ENd tail", False)  # released once decided
    assert feed_all([], ["a", "b"]) == ("ab", False)
    assert feed_all(["xyz"], ["ab", "xy"]) == ("abxy", False)  # the end of the output releases what was held


def test_held_text_is_not_sent_until_decided():
    checker = StopStrings(["STOP"])
    assert checker.feed("go ST", final=False) == ("go ", False)
    assert checker.feed("O", final=False) == ("", False)
    assert checker.feed("P!", final=False) == ("", True)
