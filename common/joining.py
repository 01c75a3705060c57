"""What a node needs to join, in its two printed forms: the `picoord-agent join` command
`coordctl token create` prints, and the first-boot file placed on a freshly flashed Pi's
boot partition (read once by the installed agent, then deleted).

Pure: the coordinator renders both, coordctl turns a command into a file, the agent parses
the file. The token is a secret: no message here ever contains it.
"""

from __future__ import annotations

import shlex
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from picoord.common.addresses import InvalidAddress, join_host_port, split_host_port
from picoord.common.names import InvalidName, validate_labels, validate_node_name
from picoord.common.pki import InvalidCaHash, parse_ca_hash
from picoord.common.tokens import BootstrapToken, InvalidToken

# Raspberry Pi OS bookworm (and Ubuntu on a Pi) mount the FAT boot partition here; older
# systems and other boards at /boot. Either is where Raspberry Pi Imager and cloud-init put
# their first-run files, writable from any computer the SD card is plugged into.
FIRST_BOOT_FILE_NAME = "picoord-join.toml"
FIRST_BOOT_DIRS = (Path("/boot/firmware"), Path("/boot"))
# The file is a few lines; anything larger is not one (and is not read into memory whole).
FIRST_BOOT_MAX_BYTES = 4096
FIRST_BOOT_KEYS = ("coordinator", "token", "ca_cert_hash", "enroll_port", "node_name", "labels")


class InvalidJoinFile(ValueError):
    """The first-boot file is not one; the message names the field, never the token."""


@dataclass(frozen=True)
class JoinParameters:
    """Everything `picoord-agent join` takes, checked."""

    coordinator: str  # HOST:PORT of the agent port
    token: BootstrapToken
    ca_cert_hash: str
    enroll_port: int | None = None  # None: the agent port + 1
    node_name: str | None = None  # None: the node's hostname
    labels: dict[str, str] = field(default_factory=dict)  # asked for; selected once accepted


def join_command(address: str, token: BootstrapToken, ca_hash: str, enroll_port: int | None = None) -> str:
    """The command `coordctl token create` prints."""
    command = f"picoord-agent join {address} --token {token} --ca-cert-hash {ca_hash}"
    return command + (f" --enroll-port {enroll_port}" if enroll_port is not None else "")


def parse_join_command(command: str) -> JoinParameters:
    """The parameters of a command join_command made (what coordctl receives)."""
    words = shlex.split(command)
    if words[:2] != ["picoord-agent", "join"] or len(words) < 3:
        raise InvalidJoinFile(f"not a picoord-agent join command: {command[:40]!r}...")
    options = dict(zip(words[3::2], words[4::2], strict=False))
    try:
        enroll = options.get("--enroll-port")
        return _checked(
            words[2],
            BootstrapToken.parse(options.get("--token", "")),
            options.get("--ca-cert-hash", ""),
            int(enroll) if enroll is not None else None,
        )
    except (InvalidToken, InvalidCaHash, InvalidAddress, ValueError) as error:
        raise InvalidJoinFile(f"the join command is not usable: {error}") from None


def _checked(
    coordinator: str,
    token: BootstrapToken,
    ca_hash: str,
    enroll_port: int | None,
    node_name: str | None = None,
    labels: dict[str, str] | None = None,
) -> JoinParameters:
    host, port = split_host_port(coordinator, "coordinator")
    if port == 0:
        raise InvalidAddress(f"invalid coordinator {coordinator!r}: port 0")
    if enroll_port is not None and not 0 < enroll_port <= 65535:
        raise InvalidAddress(f"invalid enroll_port {enroll_port}: expected 1-65535")
    return JoinParameters(
        coordinator=join_host_port(host, port),
        token=token,
        ca_cert_hash=parse_ca_hash(ca_hash),
        enroll_port=enroll_port,
        node_name=validate_node_name(node_name) if node_name is not None else None,
        labels=validate_labels(labels or {}),
    )


def render_first_boot(parameters: JoinParameters) -> str:
    """The first-boot file's text (TOML): what `coordctl token create --first-boot` prints."""
    lines = [
        "# picoord first-boot join. Put this file on the Pi's boot partition as",
        f"# /boot/firmware/{FIRST_BOOT_FILE_NAME} (Raspberry Pi OS bookworm, Ubuntu)",
        f"# or /boot/{FIRST_BOOT_FILE_NAME}; once picoord-agent is installed it starts, reads it once,",
        "# joins, and deletes it. It holds a secret: keep it off shared places.",
        f'coordinator = "{parameters.coordinator}"',
        f'token = "{parameters.token}"',
        f'ca_cert_hash = "{parameters.ca_cert_hash}"',
    ]
    if parameters.enroll_port is not None:
        lines.append(f"enroll_port = {parameters.enroll_port}")
    if parameters.node_name is not None:
        lines.append(f'node_name = "{parameters.node_name}"')
    if parameters.labels:
        pairs = ", ".join(f'"{key}" = "{value}"' for key, value in sorted(parameters.labels.items()))
        lines.append(f"labels = {{ {pairs} }}")
    return "\n".join(lines) + "\n"


def _text(values: dict[str, object], key: str, required: bool) -> str | None:
    value = values.get(key)
    if value is None:
        if required:
            raise InvalidJoinFile(f"{key} is missing")
        return None
    if not isinstance(value, str):
        raise InvalidJoinFile(f"{key} must be a string in quotes")
    return value


def parse_first_boot(data: bytes) -> JoinParameters:
    """The first-boot file's parameters, strictly: unknown keys, wrong types and bad values
    are errors naming the field. A token that does not parse is named, never shown."""
    if len(data) > FIRST_BOOT_MAX_BYTES:
        raise InvalidJoinFile(f"larger than {FIRST_BOOT_MAX_BYTES} bytes: not a first-boot file")
    try:
        # utf-8-sig: Windows editors (the card is often written from any computer) add a BOM
        values = tomllib.loads(data.decode("utf-8-sig"))
    except UnicodeDecodeError:
        raise InvalidJoinFile("not UTF-8 text") from None
    except tomllib.TOMLDecodeError as error:  # names line and column, never the content
        raise InvalidJoinFile(f"cannot read it as TOML ({error})") from None
    unknown = sorted(set(values) - set(FIRST_BOOT_KEYS))
    if unknown:
        raise InvalidJoinFile(f"unknown setting {unknown[0]!r} (known: {', '.join(FIRST_BOOT_KEYS)})")
    coordinator = _text(values, "coordinator", True)
    token_text = _text(values, "token", True)
    ca_hash = _text(values, "ca_cert_hash", True)
    node_name = _text(values, "node_name", False)
    enroll_port = values.get("enroll_port")
    if enroll_port is not None and (isinstance(enroll_port, bool) or not isinstance(enroll_port, int)):
        raise InvalidJoinFile("enroll_port must be a whole number")
    labels = values.get("labels", {})
    if not isinstance(labels, dict) or not all(isinstance(v, str) for v in labels.values()):
        raise InvalidJoinFile('labels must be a table of strings, e.g. labels = { role = "storage" }')
    assert coordinator is not None and token_text is not None and ca_hash is not None
    try:
        token = BootstrapToken.parse(token_text)
    except InvalidToken as error:
        raise InvalidJoinFile(f"token: {error}") from None
    try:
        return _checked(coordinator, token, ca_hash, enroll_port, node_name, labels)
    except InvalidCaHash as error:
        raise InvalidJoinFile(f"ca_cert_hash: {error}") from None
    except InvalidName as error:
        field_name = "node_name" if str(error).startswith("invalid node name") else "labels"
        raise InvalidJoinFile(f"{field_name}: {error}") from None
    except InvalidAddress as error:
        raise InvalidJoinFile(str(error)) from None


def first_boot_path(existing_dirs: set[Path]) -> Path:
    """Where the agent looks when agent.toml does not say: /boot/firmware if the node has
    one (Raspberry Pi OS bookworm, Ubuntu on a Pi), else /boot."""
    for directory in FIRST_BOOT_DIRS:
        if directory in existing_dirs:
            return directory / FIRST_BOOT_FILE_NAME
    return FIRST_BOOT_DIRS[-1] / FIRST_BOOT_FILE_NAME
