"""First boot (agent/first_boot.py, `picoord-agent first-boot`): what happens to the file
after each outcome, the backoff, and the running agent's wait that uses it."""

from __future__ import annotations

import argparse
import asyncio
import io
import logging
from pathlib import Path

import pytest
import structlog

import picoord.agent.cli as cli
from picoord.agent.errors import JoinError
from picoord.agent.first_boot import (
    EXIT_INVALID,
    EXIT_JOINED,
    EXIT_REFUSED,
    EXIT_RETRY,
    RETRY_FIRST,
    RETRY_MAX,
    disposition,
    next_retry_delay,
)
from picoord.agent.state import AgentFiles, Enrollment
from picoord.common.joining import InvalidJoinFile, JoinParameters
from picoord.common.tokens import BootstrapToken

FILE = Path("/boot/firmware/picoord-join.toml")
TOKEN = BootstrapToken("abcdef", "0123456789abcdef")
HASH = "sha256:" + "ab" * 32
GOOD = f'coordinator = "127.0.0.1:7443"\ntoken = "{TOKEN}"\nca_cert_hash = "{HASH}"\nnode_name = "pi-1"\n'


@pytest.mark.parametrize(
    ("outcome", "delete", "status", "level"),
    [
        (None, True, EXIT_JOINED, "info"),
        ("enrolled", True, EXIT_JOINED, "warning"),
        (InvalidJoinFile("token: malformed token"), True, EXIT_INVALID, "error"),
        (
            JoinError("the coordinator refused the token: unknown token or wrong secret"),
            True,
            EXIT_REFUSED,
            "error",
        ),
        (JoinError("CA certificate hash mismatch"), True, EXIT_REFUSED, "error"),
        (
            JoinError("cannot reach the coordinator's enrollment endpoint", transient=True),
            False,
            EXIT_RETRY,
            "warning",
        ),
        (JoinError("this node's clock says 1970-01-01", transient=True), False, EXIT_RETRY, "warning"),
        (PermissionError("denied"), False, EXIT_RETRY, "warning"),
    ],
)
def test_disposition(outcome: BaseException | str | None, delete: bool, status: int, level: str) -> None:
    decided = disposition(FILE, outcome)
    assert (decided.delete, decided.exit_status, decided.level) == (delete, status, level)
    assert str(FILE) in decided.message


def test_refusals_say_how_to_make_a_new_file() -> None:
    assert "coordctl token create --first-boot" in disposition(FILE, JoinError("refused")).message


def test_backoff_doubles_up_to_five_minutes() -> None:
    delays = [next_retry_delay(None)]
    for _ in range(10):
        delays.append(next_retry_delay(delays[-1]))
    assert delays[:4] == [RETRY_FIRST, 2 * RETRY_FIRST, 4 * RETRY_FIRST, 8 * RETRY_FIRST]
    assert delays[-1] == RETRY_MAX and max(delays) == RETRY_MAX


def test_transient_grpc_answers_are_retried_and_refusals_are_not() -> None:
    import grpc

    from picoord.agent.enroll import TRANSIENT_CODES

    assert grpc.StatusCode.UNAVAILABLE in TRANSIENT_CODES
    assert grpc.StatusCode.RESOURCE_EXHAUSTED in TRANSIENT_CODES  # the enrollment throttle
    for refusal in (
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.ALREADY_EXISTS,
        grpc.StatusCode.INVALID_ARGUMENT,
    ):
        assert refusal not in TRANSIENT_CODES


# `picoord-agent first-boot`, with the join itself replaced.


@pytest.fixture
def captured_log() -> io.StringIO:
    stream = io.StringIO()
    structlog.configure(
        processors=[structlog.processors.KeyValueRenderer()],
        logger_factory=structlog.PrintLoggerFactory(stream),
        wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG),
        cache_logger_on_first_use=False,
    )
    yield stream
    structlog.reset_defaults()


def _first_boot(
    tmp_path: Path, text: str, monkeypatch: pytest.MonkeyPatch, joined: object
) -> tuple[int, Path, list]:
    state = tmp_path / "state"
    path = tmp_path / "boot" / "picoord-join.toml"
    path.parent.mkdir()
    path.write_text(text)
    calls: list[JoinParameters] = []

    def enroll(files: AgentFiles, parameters: JoinParameters) -> Enrollment:
        calls.append(parameters)
        if isinstance(joined, BaseException):
            raise joined
        files.state_dir.mkdir(mode=0o700, exist_ok=True)
        files.enrollment_path.write_text("{}")
        return Enrollment(node_name="pi-1", coordinator=parameters.coordinator, enrolled_at=0.0)

    monkeypatch.setattr(cli, "_enroll", enroll)
    args = argparse.Namespace(file=str(path), state_dir=str(state))
    return cli.cmd_first_boot(args, {}), path, calls


def test_joined_the_file_is_deleted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, captured_log: io.StringIO
) -> None:
    status, path, calls = _first_boot(tmp_path, GOOD, monkeypatch, None)
    assert status == EXIT_JOINED and not path.exists()
    assert calls == [JoinParameters("127.0.0.1:7443", TOKEN, HASH, None, "pi-1")]
    assert "token_id='abcdef'" in captured_log.getvalue()
    assert TOKEN.secret not in captured_log.getvalue()


def test_a_refused_token_deletes_the_file_and_logs_why_not_the_token(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, captured_log: io.StringIO
) -> None:
    refused = JoinError("the coordinator refused the token: unknown token or wrong secret")
    status, path, _ = _first_boot(tmp_path, GOOD, monkeypatch, refused)
    assert status == EXIT_REFUSED and not path.exists()
    assert "refused the token" in captured_log.getvalue()
    assert TOKEN.secret not in captured_log.getvalue()


def test_an_unreachable_coordinator_keeps_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, captured_log: io.StringIO
) -> None:
    status, path, _ = _first_boot(tmp_path, GOOD, monkeypatch, JoinError("cannot reach", transient=True))
    assert status == EXIT_RETRY and path.read_text() == GOOD
    assert "kept, retrying" in captured_log.getvalue()


def test_a_malformed_file_is_deleted_unused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, captured_log: io.StringIO
) -> None:
    status, path, calls = _first_boot(tmp_path, GOOD + "tokn = 1\n", monkeypatch, None)
    assert (status, calls, path.exists()) == (EXIT_INVALID, [], False)
    assert "unknown setting 'tokn'" in captured_log.getvalue()
    assert TOKEN.secret not in captured_log.getvalue()


def test_an_enrolled_node_deletes_the_file_unused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, captured_log: io.StringIO
) -> None:
    (tmp_path / "state").mkdir(mode=0o700)
    (tmp_path / "state" / "enrollment.json").write_text("{}")
    status, path, calls = _first_boot(tmp_path, GOOD, monkeypatch, None)
    assert (status, calls, path.exists()) == (EXIT_JOINED, [], False)
    assert "enrolled already" in captured_log.getvalue()


# The running agent's wait: tries the file while not enrolled, with backoff while it is kept.


class FakeFiles:
    def __init__(self) -> None:
        self.enrolled: Enrollment | None = None

    def load(self) -> Enrollment:
        from picoord.agent.state import NotEnrolled

        if self.enrolled is None:
            raise NotEnrolled("not joined: run picoord-agent join HOST:7443 --token ...")
        return self.enrolled


def test_wait_for_join_uses_the_file_and_backs_off_while_it_is_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cli, "notify", lambda _text: None)
    path = tmp_path / "picoord-join.toml"
    path.write_text(GOOD)
    files = FakeFiles()
    now = [0.0]
    attempts: list[float] = []
    answers = [EXIT_RETRY, EXIT_RETRY, EXIT_JOINED]

    async def attempt(seen: Path) -> int:
        assert seen == path
        attempts.append(now[0])
        status = answers.pop(0)
        if status == EXIT_JOINED:
            files.enrolled = Enrollment(node_name="pi-1", coordinator="127.0.0.1:7443", enrolled_at=0.0)
        return status

    async def sleep(seconds: float) -> None:
        now[0] += seconds

    monkeypatch.setattr(cli.asyncio, "sleep", sleep)
    enrollment = asyncio.run(
        cli.wait_for_join(files, poll=1.0, first_boot=path, attempt=attempt, clock=lambda: now[0])  # type: ignore[arg-type]
    )
    assert enrollment.node_name == "pi-1"
    assert attempts == [0.0, RETRY_FIRST, 3 * RETRY_FIRST]  # 5 s, then 10 s later


def test_wait_for_join_without_a_file_only_waits(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli, "notify", lambda _text: None)
    files = FakeFiles()
    polls = []

    async def attempt(_path: Path) -> int:
        raise AssertionError("no file: nothing to attempt")

    async def sleep(seconds: float) -> None:
        polls.append(seconds)
        if len(polls) == 3:
            files.enrolled = Enrollment(node_name="pi-1", coordinator="x:1", enrolled_at=0.0)

    monkeypatch.setattr(cli.asyncio, "sleep", sleep)
    asyncio.run(cli.wait_for_join(files, poll=1.0, first_boot=tmp_path / "absent.toml", attempt=attempt))  # type: ignore[arg-type]
    assert polls == [1.0, 1.0, 1.0]


def test_the_first_boot_file_setting_and_its_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    assert cli.first_boot_file({"first_boot_file": "/srv/join.toml"}) == Path("/srv/join.toml")
    monkeypatch.setattr(Path, "is_dir", lambda self: str(self) == "/boot/firmware")
    assert cli.first_boot_file({}) == Path("/boot/firmware/picoord-join.toml")


def test_a_hostname_that_is_no_node_name_deletes_the_file_and_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, captured_log: io.StringIO
) -> None:
    from picoord.common.names import InvalidName

    text = GOOD.replace('node_name = "pi-1"\n', "")
    status, path, _ = _first_boot(tmp_path, text, monkeypatch, InvalidName("invalid node name 'Pi_1'"))
    assert (status, path.exists()) == (EXIT_REFUSED, False)
    assert "invalid node name 'Pi_1'" in captured_log.getvalue()


def test_the_running_agents_first_boot_side_never_loads_cryptography() -> None:
    """The join (and cryptography, ~10 MiB) happens in the child; the waiting agent only
    looks for the file and starts it."""
    import subprocess
    import sys

    probe = (
        "import sys, picoord.agent.cli, picoord.agent.first_boot, picoord.common.joining; "
        "sys.exit('cryptography' in sys.modules)"
    )
    assert subprocess.run([sys.executable, "-c", probe], timeout=60, check=False).returncode == 0
