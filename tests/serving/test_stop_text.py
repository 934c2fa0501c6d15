"""StopText: a stop string split across chunks is never released, not even in part; text that
only looked like one is released as soon as it is known not to be."""

from lmlab.generation.stopping import StopText


def stream(stop_text: StopText, chunks: list[str]) -> list[str]:
    return [stop_text.push(c) for c in chunks]


def test_a_stop_string_split_across_chunks_is_held_back_then_cut():
    s = StopText(["END"])
    assert stream(s, ["ab", "cE", "N", "D tail"]) == ["ab", "c", "", ""]
    assert s.ended and s.shown == "abc" and s.finish() == ""


def test_a_false_start_is_released_once_it_cannot_be_a_stop_string():
    s = StopText(["END", "\n\n"])
    assert stream(s, ["x E", "NX", "\n", "y"]) == ["x ", "ENX", "", "\ny"]
    assert s.finish() == "" and s.shown == "x ENX\ny" and not s.ended


def test_trim_drops_the_whitespace_before_a_stop_and_finish_releases_the_rest():
    s = StopText(["### User:"], trim=True)
    assert stream(s, ["Hi", " there", "\n\n#", "## User:"]) == ["Hi", " there", "", ""]
    assert s.shown == "Hi there"
    t = StopText(["### User:"], trim=True)
    assert stream(t, ["Hi", "\n\n#"]) == ["Hi", ""]
    assert t.finish() == "\n\n#" and t.shown == "Hi\n\n#"
