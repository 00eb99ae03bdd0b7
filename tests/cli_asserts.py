"""Assertions shared by the CLI tests."""

from __future__ import annotations


def assert_one_line_error(result, *fragments):
    """A user error: non-zero exit, exactly one "Error: ..." line holding each fragment, no traceback."""
    assert result.exit_code != 0
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, result.output
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
