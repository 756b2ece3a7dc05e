"""Stop strings in generated text (simplegpt/generation/text.py): TextAssembler gives exactly the
pieces of the plain definition below on random cases (multi-byte characters split across feeds,
invalid bytes, overlapping and nested stops), and its work grows linearly with the text and the
stops' length, counted as Python line events (deterministic), not timed."""

from __future__ import annotations

import codecs
import random
import sys

import pytest

from simplegpt.generation import text as text_module
from simplegpt.generation.text import StopMatcher, TextAssembler
from simplegpt.serve.params import MAX_STOP_CHARS


class PlainAssembler:
    """The definition, written plainly (quadratic, for tests only): after each feed the text so far is
    cut before the earliest-starting stop string (of two starting together, the smaller string), and
    the longest end of it that begins some stop string is held back."""

    def __init__(self, stops):
        self.stops, self.emitted, self.matched, self.text = list(stops), 0, None, ""
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")  # holds a split character

    def feed(self, data: bytes, final: bool = False) -> str:
        if self.matched is not None:
            return ""
        text = self.text + self.decoder.decode(data, final=final)
        hits = []
        for s in self.stops:
            for i in range(len(text) - len(s) + 1):
                if text[i:i + len(s)] == s:
                    hits.append((i, s))
                    break
        hold = 0
        if hits:
            cut, self.matched = min(hits)
            text = text[:cut]
        elif not final:
            for s in self.stops:
                for k in range(1, len(s)):
                    if text.endswith(s[:k]):
                        hold = max(hold, k)
        self.text = text
        piece = text[self.emitted:len(text) - hold]
        self.emitted += len(piece)
        return piece


ALPHABETS = ["ab", "abc\n", "aé€😀", "xy😀"]


def random_case(rng: random.Random):
    alphabet = rng.choice(ALPHABETS)
    stops = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 6))) for _ in range(rng.randint(0, 4))]
    text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
    data = text.encode()
    if rng.random() < 0.2:  # invalid bytes too: each becomes U+FFFD, as the decoder replaces them
        at = rng.randint(0, len(data))
        data = data[:at] + rng.choice([b"\xff", b"\xe2\x82", b"\x80"]) + data[at:]
    cuts = sorted(rng.sample(range(1, len(data)), min(len(data) - 1, rng.randint(0, 20)))) if len(data) > 1 else []
    chunks = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)])]
    return stops, chunks


def run(assembler, chunks):
    """Feeds chunks until a stop string matches (a row ends there), then the end if none did."""
    pieces = []
    for c in chunks:
        pieces.append(assembler.feed(c))
        if assembler.matched is not None:
            break
    if assembler.matched is None:
        pieces.append(assembler.feed(b"", final=True))
    return pieces, assembler.matched, assembler.text


def test_same_pieces_as_the_plain_definition_on_random_cases():
    rng = random.Random(1234)
    matched = 0
    for _ in range(3000):
        stops, chunks = random_case(rng)
        expected = run(PlainAssembler(stops), chunks)
        assert run(TextAssembler(stops), chunks) == expected, (stops, chunks)
        matched += expected[1] is not None
    assert matched > 500  # the cases do exercise stops


@pytest.mark.parametrize("stops, chunks, pieces, matched", [
    (["abcd", "c"], [b"abcd"], [""], "abcd"),  # the earliest start wins, not the earliest end
    (["ab", "abc"], [b"xab", b"c"], ["x"], "ab"),  # two starting together: the smaller string
    (["\u20ac!"], [b"1\xe2\x82", b"\xac", b"?"], ["1", "", "\u20ac?"], None),  # a character split over feeds
    (["aab"], [b"a", b"a", b"a", b"b", b"z"], ["", "", "a"], "aab"),  # a partial match that restarts
])
def test_known_cases(stops, chunks, pieces, matched):
    assembler = TextAssembler(stops)
    got = [assembler.feed(c) for c in chunks]
    got += [] if assembler.matched else [assembler.feed(b"", final=True)]
    assert got[:len(pieces)] == pieces and assembler.matched == matched
    assert "".join(got) == assembler.text


def test_matcher_rejects_an_empty_stop():
    with pytest.raises(ValueError, match="empty"):
        StopMatcher("")


def matching_work(stop_len: int, n_chars: int) -> int:
    """Python line events run in text.py while 4 stops of stop_len characters (each almost matched
    over and over: 'aaa...ab' against a text of 'a's with a 'b'-less break now and then) watch a
    generation of n_chars characters fed one at a time."""
    stops = ["a" * (stop_len - 1) + c for c in "bcde"]
    chars = ["x" if i % (stop_len // 2 + 7) == 0 else "a" for i in range(n_chars)]
    assembler = TextAssembler(stops)
    count = [0]
    target = text_module.__file__

    def tracer(frame, event, arg):
        if frame.f_code.co_filename != target:
            return None

        def local(frame, event, arg):
            if event == "line":
                count[0] += 1
            return local
        return local

    sys.settrace(tracer)
    try:
        out = [assembler.feed(c.encode()) for c in chars]
    finally:
        sys.settrace(None)
    assert assembler.matched is None and "".join(out) + assembler.text[len("".join(out)):] == "".join(chars)
    return count[0]


def test_matching_work_is_linear_in_the_text_and_the_stops_length():
    """The issue's case was four 1M-character stops holding the server for 46 s for one token: the held
    tail was compared with every prefix of every stop at each token. Now each new character costs a
    bounded, amortized number of steps per stop, and each stop's length is paid once."""
    short, long_ = matching_work(MAX_STOP_CHARS, 2000), matching_work(MAX_STOP_CHARS, 8000)
    assert long_ < 4.6 * short  # 4x the text: about 4x the work (a quadratic cost gives 16x)
    small, big = matching_work(16, 4000), matching_work(MAX_STOP_CHARS, 4000)
    # 16x longer stops: the work grows by the stops' own length (the failure tables), not 16x per character
    assert big - small < 100 * 4 * MAX_STOP_CHARS
    assert big < 1.5 * small
    # a bound on the whole: at most a few dozen steps per character and stop
    assert big < 40 * 4 * (4000 + MAX_STOP_CHARS)


def test_the_server_bounds_each_stop_strings_length():
    """The server takes stop strings up to MAX_STOP_CHARS characters, and refuses a longer one with a
    400 that names `stop` and the limit (the matcher's work grows with a stop's length)."""
    from simplegpt.serve.errors import APIError
    from simplegpt.serve.params import sampling_params
    from simplegpt.serve.schemas import CompletionRequest

    def params(stop):
        return sampling_params(CompletionRequest(model="m", prompt="A", stop=stop), 16, [], 4096)

    assert params(["é" * MAX_STOP_CHARS] * 4).stop == ("é" * MAX_STOP_CHARS,) * 4
    with pytest.raises(APIError) as e:
        params(["x", "y" * (MAX_STOP_CHARS + 1)])
    assert e.value.param == "stop" and str(MAX_STOP_CHARS) in e.value.message and e.value.status == 400
