"""Stop strings, checked against a search of the whole text, however the text is split into deltas."""

from hypothesis import given
from hypothesis import strategies as st

from engine.sequence import StopStrings

ALPHABET = "ab c."


@given(text=st.text(ALPHABET, max_size=40), cuts=st.lists(st.integers(0, 40), max_size=12),
       stops=st.lists(st.text(ALPHABET, min_size=1, max_size=4), min_size=1, max_size=3))
def test_output_is_the_text_before_the_first_stop(text, cuts, stops):
    bounds = sorted({0, len(text), *(c for c in cuts if c <= len(text))})
    deltas = [text[a:b] for a, b in zip(bounds, bounds[1:])]
    s = StopStrings(tuple(stops))
    out, stopped = [], False
    for d in deltas:
        released, stopped = s.feed(d)
        out.append(released)
        if stopped:
            break
    if not stopped:
        out.append(s.flush(""))
    # reference: read the text a character at a time and cut at the first stop string that is complete
    ends = [(i + len(stop), i) for stop in stops if (i := text.find(stop)) >= 0]
    assert "".join(out) == (text[: min(ends)[1]] if ends else text)
    assert stopped == bool(ends)


def test_nothing_of_a_stop_string_is_released_early():
    s = StopStrings(("STOP",))
    assert s.feed("abc ST") == ("abc ", False)  # "ST" may begin STOP: held
    assert s.feed("O") == ("", False)
    assert s.feed("Px") == ("", True)


def test_held_text_is_released_when_it_cannot_start_a_stop():
    s = StopStrings(("STOP",))
    assert s.feed("ST") == ("", False)
    assert s.feed("ay") == ("STay", False)
    assert s.flush("") == ""
