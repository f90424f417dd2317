"""loopui.messages: the one one-line formatter every room uses for error text."""

from __future__ import annotations

from loopui.messages import REASON_LIMIT, one_line


def test_one_line_collapses_whitespace_and_names_an_empty_error():
    assert one_line(OSError("cannot read\n  model_index.json:\tno such file ")) == \
        "cannot read model_index.json: no such file"
    assert one_line(KeyError()) == "KeyError"
    assert one_line("  plain\ntext ") == "plain text"
    assert one_line("") == ""


def test_one_line_cuts_to_the_limit_with_an_ellipsis():
    long = RuntimeError("x" * (REASON_LIMIT + 50))
    cut = one_line(long, REASON_LIMIT)
    assert len(cut) == REASON_LIMIT and cut.endswith("x...")
    assert one_line(RuntimeError("short"), REASON_LIMIT) == "short"
    assert one_line(long) == "x" * (REASON_LIMIT + 50)  # no limit: the whole message
