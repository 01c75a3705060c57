"""The join command and the first-boot file (common/joining.py): rendered, parsed, refused."""

from __future__ import annotations

from pathlib import Path

import pytest

from picoord.common.joining import (
    FIRST_BOOT_MAX_BYTES,
    InvalidJoinFile,
    JoinParameters,
    first_boot_path,
    join_command,
    parse_first_boot,
    parse_join_command,
    render_first_boot,
)
from picoord.common.tokens import BootstrapToken

TOKEN = BootstrapToken("abcdef", "0123456789abcdef")
HASH = "sha256:" + "ab" * 32
GOOD = f'coordinator = "192.168.1.10:7443"\ntoken = "{TOKEN}"\nca_cert_hash = "{HASH}"\n'


@pytest.mark.parametrize(
    ("address", "enroll_port"),
    [("192.168.1.10:7443", None), ("desktop.lan:7443", 9000), ("[fd00::1]:7443", None)],
)
def test_a_join_command_parses_back_and_becomes_a_file_that_parses_back(
    address: str, enroll_port: int | None
) -> None:
    command = join_command(address, TOKEN, HASH, enroll_port)
    parameters = parse_join_command(command)
    assert parameters == JoinParameters(address, TOKEN, HASH, enroll_port)
    named = JoinParameters(address, TOKEN, HASH, enroll_port, "pi-3", {"role": "storage", "zone": "rack-1"})
    assert parse_first_boot(render_first_boot(named).encode()) == named


def test_the_printed_command_keeps_its_shape() -> None:
    assert join_command("10.0.0.1:7443", TOKEN, HASH) == (
        f"picoord-agent join 10.0.0.1:7443 --token {TOKEN} --ca-cert-hash {HASH}"
    )
    assert join_command("10.0.0.1:7443", TOKEN, HASH, 9000).endswith(" --enroll-port 9000")


@pytest.mark.parametrize(
    ("text", "named"),
    [
        (GOOD + "extra = 1\n", "unknown setting 'extra'"),
        (GOOD.replace('coordinator = "192.168.1.10:7443"\n', ""), "coordinator is missing"),
        (GOOD.replace(f'token = "{TOKEN}"\n', ""), "token is missing"),
        (GOOD.replace(f'ca_cert_hash = "{HASH}"\n', ""), "ca_cert_hash is missing"),
        (GOOD.replace('"192.168.1.10:7443"', "7443"), "coordinator must be a string"),
        (GOOD.replace('"192.168.1.10:7443"', '"192.168.1.10"'), "invalid coordinator"),
        (GOOD.replace('"192.168.1.10:7443"', '"192.168.1.10:0"'), "port 0"),
        (GOOD.replace(HASH, "sha256:abc"), "ca_cert_hash: malformed"),
        (GOOD + 'node_name = "Pi_1"\n', "node_name: invalid node name"),
        (GOOD + "node_name = 3\n", "node_name must be a string"),
        (GOOD + "enroll_port = 70000\n", "invalid enroll_port 70000"),
        (GOOD + 'enroll_port = "7444"\n', "enroll_port must be a whole number"),
        (GOOD + "enroll_port = true\n", "enroll_port must be a whole number"),
        (GOOD + 'labels = ["a"]\n', "labels must be a table"),
        (GOOD + 'labels = { "bad key!" = "x" }\n', "labels: invalid label key"),
        (GOOD + "labels = { role = 1 }\n", "labels must be a table"),
        (GOOD + 'coordinator = "x:1"\n', "cannot read it as TOML"),  # a key set twice
        ("coordinator = \n", "cannot read it as TOML"),
    ],
)
def test_a_bad_first_boot_file_is_refused_naming_the_field(text: str, named: str) -> None:
    with pytest.raises(InvalidJoinFile, match=named.replace("(", r"\(")):
        parse_first_boot(text.encode())


@pytest.mark.parametrize("secret", ["0123456789ABCDEF", "0123456789abcde", "0123456789abcdef0", "x" * 40])
def test_a_bad_token_is_named_never_shown(secret: str) -> None:
    text = GOOD.replace(str(TOKEN), f"abcdef.{secret}")
    with pytest.raises(InvalidJoinFile) as raised:
        parse_first_boot(text.encode())
    assert str(raised.value).startswith("token: malformed token")
    assert secret not in str(raised.value)


def test_a_valid_token_never_appears_in_a_refusal() -> None:
    for text in (GOOD + "extra = 1\n", GOOD.replace(HASH, "sha256:x"), GOOD + 'node_name = "-"\n'):
        with pytest.raises(InvalidJoinFile) as raised:
            parse_first_boot(text.encode())
        assert TOKEN.secret not in str(raised.value)
    assert TOKEN.secret not in repr(parse_first_boot(GOOD.encode()))


def test_large_or_binary_files_are_refused() -> None:
    with pytest.raises(InvalidJoinFile, match="larger than"):
        parse_first_boot(GOOD.encode() + b"#" * FIRST_BOOT_MAX_BYTES)
    with pytest.raises(InvalidJoinFile, match="not UTF-8"):
        parse_first_boot(b"\xff\xfe" + GOOD.encode())


def test_a_join_command_of_another_kind_is_refused() -> None:
    with pytest.raises(InvalidJoinFile, match="not a picoord-agent join command"):
        parse_join_command("kubeadm join 10.0.0.1:6443 --token x")
    with pytest.raises(InvalidJoinFile, match="not usable"):
        parse_join_command("picoord-agent join 10.0.0.1:7443 --token nope --ca-cert-hash " + HASH)


@pytest.mark.parametrize(
    ("dirs", "expected"),
    [
        ({Path("/boot/firmware"), Path("/boot")}, "/boot/firmware/picoord-join.toml"),
        ({Path("/boot")}, "/boot/picoord-join.toml"),
        (set(), "/boot/picoord-join.toml"),
    ],
)
def test_first_boot_path(dirs: set[Path], expected: str) -> None:
    assert str(first_boot_path(dirs)) == expected


def test_coordctl_token_create_first_boot_prints_a_file_the_agent_reads(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from picoord.coordinator.ctl import cli
    from picoord.v1 import admin_pb2

    class Stub:
        def CreateToken(
            self, request: admin_pb2.CreateTokenRequest, timeout: float
        ) -> admin_pb2.CreateTokenResponse:
            return admin_pb2.CreateTokenResponse(
                token=str(TOKEN),
                ca_cert_hash=HASH,
                join_command=join_command("192.168.1.10:7443", TOKEN, HASH, 9000),
                info=admin_pb2.TokenInfo(token_id=TOKEN.token_id, expires_at=1e9),
            )

    args = cli.build_parser().parse_args(["token", "create", "--first-boot", "--node-name", "pi-4"])
    assert cli.cmd_token_create(Stub(), args) == 0  # type: ignore[arg-type]
    printed = capsys.readouterr()
    assert parse_first_boot(printed.out.encode()) == JoinParameters(
        "192.168.1.10:7443", TOKEN, HASH, 9000, "pi-4"
    )
    assert "# token abcdef" in printed.err
    with pytest.raises(SystemExit):
        cli.main(["token", "create", "--node-name", "pi-4"])  # --node-name only with --first-boot
    assert "--node-name goes with --first-boot" in capsys.readouterr().err


def test_a_file_saved_by_a_windows_editor_reads_the_same() -> None:
    windows = b"\xef\xbb\xbf" + GOOD.replace("\n", "\r\n").encode()
    assert parse_first_boot(windows) == parse_first_boot(GOOD.encode())
