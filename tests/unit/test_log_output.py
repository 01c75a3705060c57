"""Where the daemons' logs go and how they look: JSON lines with a syslog priority on
stdout when journald holds stdout (JOURNAL_STREAM names it), readable lines on a terminal,
JSON lines on stderr in a pipe; the level comes from config."""

from __future__ import annotations

import json
import os
import pty
import re
import select
import subprocess
import sys
from pathlib import Path

import pytest

from picoord.common.logs import check_level, journal_stream_is, log_output

SCRIPT = """
import sys
import structlog
from picoord.common.logs import configure_logging
configure_logging(sys.argv[1])
log = structlog.get_logger("test")
log.debug("debug_event")
log.info("info_event", node="pi1", token="s3cret")
log.error("error_event", code=7)
"""


@pytest.mark.parametrize(
    ("journal", "terminal", "configured", "expected"),
    [
        (True, False, None, ("json", "stdout")),
        (True, True, None, ("json", "stdout")),
        (True, False, False, ("console", "stdout")),
        (False, True, None, ("console", "stderr")),
        (False, False, None, ("json", "stderr")),
        (False, True, True, ("json", "stderr")),
        (False, False, False, ("console", "stderr")),
    ],
)
def test_log_output(
    journal: bool, terminal: bool, configured: bool | None, expected: tuple[str, str]
) -> None:
    assert log_output(journal, terminal, configured) == expected


def test_journal_stream_must_name_the_stream(tmp_path: Path) -> None:
    stat = os.stat(tmp_path)
    other = os.stat("/")
    assert journal_stream_is({"JOURNAL_STREAM": f"{stat.st_dev}:{stat.st_ino}"}, stat)
    assert not journal_stream_is({"JOURNAL_STREAM": f"{other.st_dev}:{other.st_ino}"}, stat)  # inherited
    assert not journal_stream_is({}, stat)
    assert not journal_stream_is({"JOURNAL_STREAM": "garbage"}, stat)
    assert not journal_stream_is({"JOURNAL_STREAM": f"{stat.st_dev}:{stat.st_ino}"}, None)


@pytest.mark.parametrize(
    ("level", "expected"), [("info", "info"), (" DEBUG ", "debug"), ("Warning", "warning")]
)
def test_check_level(level: str, expected: str) -> None:
    assert check_level(level) == expected


def test_check_level_names_the_choices() -> None:
    with pytest.raises(ValueError, match="'loud' is not one of debug, info, warning, error, critical"):
        check_level("loud")


def _run(
    level: str, stdout: object, env: dict[str, str], stderr: object = subprocess.PIPE
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", SCRIPT, level], stdout=stdout, stderr=stderr, env=env, timeout=60, check=True
    )


def test_under_journald_json_lines_with_priorities_on_stdout(tmp_path: Path) -> None:
    """journald's stream is a socket; a file stands in for it: JOURNAL_STREAM names its inode."""
    out = tmp_path / "journal"
    with out.open("wb") as stream:
        stat = os.fstat(stream.fileno())
        env = {**os.environ, "JOURNAL_STREAM": f"{stat.st_dev}:{stat.st_ino}"}
        done = _run("info", stream, env)
    assert done.stderr == b""
    lines = out.read_text().splitlines()
    assert [line[:3] for line in lines] == ["<6>", "<3>"]  # no debug at level info
    info, error = (json.loads(line[3:]) for line in lines)
    assert (info["event"], info["level"], info["node"], info["token"]) == (
        "info_event",
        "info",
        "pi1",
        "<redacted>",
    )
    assert (error["event"], error["level"], error["code"]) == ("error_event", "error", 7)
    assert info["timestamp"].endswith("Z")


def test_in_a_pipe_json_lines_on_stderr() -> None:
    done = _run("debug", subprocess.PIPE, {k: v for k, v in os.environ.items() if k != "JOURNAL_STREAM"})
    assert done.stdout == b""
    events = [json.loads(line)["event"] for line in done.stderr.decode().splitlines()]
    assert events == ["debug_event", "info_event", "error_event"]


def test_on_a_terminal_readable_lines() -> None:
    main, child = pty.openpty()
    try:
        env = {k: v for k, v in os.environ.items() if k != "JOURNAL_STREAM"}
        process = subprocess.Popen(
            [sys.executable, "-c", SCRIPT, "warning"], stdin=child, stdout=child, stderr=child, env=env
        )
        os.close(child)
        output = b""
        while True:
            ready, _, _ = select.select([main], [], [], 30)
            if not ready:
                break
            try:
                chunk = os.read(main, 4096)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            output += chunk
        assert process.wait(30) == 0
    finally:
        os.close(main)
    text = re.sub(r"\x1b\[[0-9;]*m", "", output.decode())  # colours off
    assert "error_event" in text and "info_event" not in text  # level warning
    assert not text.lstrip().startswith("{")  # not JSON
    assert re.search(r"\[error\s*\] error_event\s+code=7", text), text
