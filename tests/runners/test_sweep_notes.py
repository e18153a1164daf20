"""A failed configuration's note: the exception in one line, with the cause of a multi-line message."""

from mmprof.runners.sweep import guarded, one_line


def test_note_keeps_the_first_and_last_lines_of_a_long_message():
    exc = RuntimeError("at 186:16:\n    _next_sums(v, a)\n    ^\nValueError: operand types differ\n")
    assert one_line(exc) == "RuntimeError: at 186:16: ... ValueError: operand types differ"
    assert one_line(ValueError("bad size")) == "ValueError: bad size"
    assert one_line(KeyError()) == "KeyError: "
    assert len(one_line(RuntimeError("x" * 1000))) == 300


def test_a_failing_configuration_becomes_an_error_row():
    def fail():
        raise RuntimeError("first\nsecond")

    assert guarded(fail, "cpu") == {"status": "error", "note": "RuntimeError: first ... second"}
    assert guarded(lambda: {"x": 1}, "cpu") == {"status": "ok", "x": 1}
