"""`picoord-agent`: `join` once with the command `coordctl token create` printed, then `run`."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING

import structlog

from picoord.agent.errors import JoinError
from picoord.agent.state import FIREWALL_REVERT_FILE, AgentFiles, Enrollment, NotEnrolled
from picoord.common import VERSION, defaults
from picoord.common.addresses import InvalidAddress
from picoord.common.configfile import ConfigFileError, fix_hint, read_settings, where
from picoord.common.files import UnsafeStateDir, check_state_dir
from picoord.common.joining import (
    FIRST_BOOT_DIRS,
    FIRST_BOOT_MAX_BYTES,
    InvalidJoinFile,
    JoinParameters,
    first_boot_path,
    parse_first_boot,
)
from picoord.common.logs import configure_logging
from picoord.common.names import InvalidName, parse_label_assignment, validate_node_name
from picoord.common.pki import InvalidCaHash, parse_ca_hash
from picoord.common.sd_notify import feed_watchdog, notify
from picoord.common.tokens import BootstrapToken, InvalidToken

if TYPE_CHECKING:
    from picoord.agent.session import RunSettings

log = structlog.get_logger("picoord.agent")


SERVICE = "picoord-agent"
LOG_LEVELS = ("debug", "info", "warning", "error")
# How often `run --wait-for-join` looks for the enrollment `join` writes.
JOIN_POLL_SECONDS = 2.0
MAX_METRICS_INTERVAL = 3600.0


def _absolute_path(value: object) -> str:
    if not isinstance(value, str) or not value.startswith("/") or "\0" in value:
        raise ValueError("must be an absolute path")
    return os.path.normpath(value)


def _metrics_interval(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError("must be a number of seconds")
    if not defaults.MIN_METRICS_INTERVAL_SECONDS <= value <= MAX_METRICS_INTERVAL:
        raise ValueError(
            f"must be between {defaults.MIN_METRICS_INTERVAL_SECONDS:g} and {MAX_METRICS_INTERVAL:g}"
        )
    return float(value)


def _log_level(value: object) -> str:
    if value not in LOG_LEVELS:
        raise ValueError(f"must be one of {', '.join(LOG_LEVELS)}")
    return str(value)


def _allowed_paths(value: object) -> tuple[str, ...]:
    """Paths this node lets mounts use although they are system paths (see
    common/validation.py); "/" would allow everything and is refused."""
    if not isinstance(value, list):
        raise ValueError('must be a list of absolute paths, e.g. ["/srv/x"]')
    paths = tuple(dict.fromkeys(_absolute_path(item) for item in value))
    if "/" in paths:
        raise ValueError('"/" would allow mounting anywhere; name the paths themselves')
    return paths


AGENT_SETTINGS: dict[str, Callable[[object], object]] = {
    "state_dir": _absolute_path,
    "metrics_interval": _metrics_interval,
    "log_level": _log_level,
    "docker_socket": _absolute_path,
    "allow_mount_paths": _allowed_paths,
    "first_boot_file": _absolute_path,
}


class UsageError(Exception):
    pass


def load_config(path: Path, required: bool) -> dict[str, object]:
    """Settings from /etc/picoord/agent.toml; unknown keys and bad values are an error
    naming the file, the line and the key, not a silent typo."""
    values, text = read_settings(path, required, SERVICE)
    settings: dict[str, object] = {}
    for key, value in values.items():
        name = key.replace("-", "_")
        if name not in AGENT_SETTINGS:
            raise ConfigFileError(
                f"{where(path, text, key)}: unknown setting {key!r} (known: {', '.join(AGENT_SETTINGS)}): "
                + fix_hint(path, SERVICE)
            )
        try:
            settings[name] = AGENT_SETTINGS[name](value)
        except (TypeError, ValueError) as error:
            raise ConfigFileError(
                f"{where(path, text, key)}: {key} = {str(value)[:80]!r} is invalid: {error}: "
                + fix_hint(path, SERVICE)
            ) from None
    return settings


def _read_token(args: argparse.Namespace) -> BootstrapToken:
    # --token is what the printed join command uses; --token-file and the environment keep
    # the secret out of `ps` and shell history for those who prefer.
    sources = [s for s in (args.token, args.token_file, os.environ.get(defaults.JOIN_TOKEN_ENV)) if s]
    if not sources:
        raise UsageError(
            f"a bootstrap token is required: --token, --token-file or ${defaults.JOIN_TOKEN_ENV}"
        )
    if args.token:
        text = args.token
    elif args.token_file:
        text = Path(args.token_file).read_text()
    else:
        text = os.environ[defaults.JOIN_TOKEN_ENV]
    return BootstrapToken.parse(text)


def _state_files(args: argparse.Namespace, settings: dict[str, object]) -> AgentFiles:
    return AgentFiles(Path(args.state_dir or settings.get("state_dir") or defaults.AGENT_STATE_DIR))


def _enroll(files: AgentFiles, parameters: JoinParameters) -> Enrollment:
    """Join with checked parameters (the command line's or a first-boot file's)."""
    from picoord.agent.enroll import Endpoint, join  # cryptography: only a join needs it

    node_name = validate_node_name(parameters.node_name or socket.gethostname().split(".")[0].lower())
    coordinator = Endpoint.parse(parameters.coordinator)
    enroll_endpoint = Endpoint(coordinator.host, parameters.enroll_port or coordinator.port + 1)
    return join(
        files,
        coordinator,
        enroll_endpoint,
        parameters.token,
        parameters.ca_cert_hash,
        node_name,
        parameters.labels,
    )


def cmd_join(args: argparse.Namespace, settings: dict[str, object]) -> int:
    parameters = JoinParameters(
        coordinator=args.coordinator,
        token=_read_token(args),
        ca_cert_hash=parse_ca_hash(args.ca_cert_hash),
        enroll_port=args.enroll_port,
        node_name=validate_node_name(args.node_name) if args.node_name else None,
        labels=dict(parse_label_assignment(item) for item in args.label),
    )
    files = _state_files(args, settings)
    check_state_dir(files.state_dir)
    if files.enrollment_path.exists() and not args.force:
        raise UsageError(
            f"already enrolled ({files.enrollment_path} exists): remove the node with "
            "`coordctl node remove` and re-run join with --force to enroll again"
        )
    enrollment = _enroll(files, parameters)
    print(f"node {enrollment.node_name} enrolled with {enrollment.coordinator}; now start: picoord-agent run")
    if parameters.labels:  # what the node asks for selects nothing until an operator says so
        asked = ",".join(f"{key}={value}" for key, value in sorted(parameters.labels.items()))
        print(f"labels {asked} wait for the operator: coordctl node accept {enrollment.node_name}")
    return 0


def first_boot_file(settings: dict[str, object]) -> Path:
    """agent.toml's first_boot_file, else /boot/firmware/picoord-join.toml where the node
    has /boot/firmware (Raspberry Pi OS bookworm, Ubuntu on a Pi), else /boot/picoord-join.toml."""
    if "first_boot_file" in settings:
        return Path(str(settings["first_boot_file"]))
    return first_boot_path({directory for directory in FIRST_BOOT_DIRS if directory.is_dir()})


def cmd_first_boot(args: argparse.Namespace, settings: dict[str, object]) -> int:
    """Join once with the first-boot file, then delete it (agent/first_boot.py decides
    when). What the running agent starts when it finds the file; runnable by hand too."""
    from picoord.agent.first_boot import disposition, finish

    path = Path(args.file) if args.file else first_boot_file(settings)
    files = _state_files(args, settings)
    check_state_dir(files.state_dir)
    if not path.exists():
        print(f"picoord-agent: no first-boot file at {path}: nothing to do", file=sys.stderr)
        return 0
    if files.enrollment_path.exists():
        return finish(path, disposition(path, "enrolled"))
    try:
        with path.open("rb") as handle:
            data = handle.read(FIRST_BOOT_MAX_BYTES + 1)
        parameters = parse_first_boot(data)
        log.info(
            "first-boot join",
            file=str(path),
            coordinator=parameters.coordinator,
            token_id=parameters.token.token_id,
        )
        enrollment = _enroll(files, parameters)
    except (InvalidJoinFile, InvalidName, JoinError, OSError) as error:  # InvalidName: the hostname
        return finish(path, disposition(path, error))
    log.info("enrolled", node=enrollment.node_name, coordinator=enrollment.coordinator)
    return finish(path, disposition(path, None))


def cmd_check(args: argparse.Namespace, settings: dict[str, object]) -> int:
    """Preflight: what this node lacks (agent/preflight.py); 1 when a required part is missing."""
    import json

    from picoord.agent.preflight import as_dicts, evaluate, exit_status, gather, render

    checks = evaluate(gather(str(settings.get("docker_socket", defaults.DOCKER_SOCKET))))
    print(json.dumps(as_dicts(checks), indent=2) if args.output == "json" else render(checks))
    return exit_status(checks)


def run_settings(args: argparse.Namespace, settings: dict[str, object]) -> tuple[AgentFiles, RunSettings]:
    """Command line over agent.toml over the defaults."""
    from picoord.agent.session import RunSettings

    interval = (
        args.metrics_interval if args.metrics_interval is not None else settings.get("metrics_interval")
    )
    if (
        interval is not None
        and not defaults.MIN_METRICS_INTERVAL_SECONDS <= float(interval) <= MAX_METRICS_INTERVAL
    ):
        raise ConfigFileError("--metrics-interval must be between 1 and 3600 seconds")
    files = AgentFiles(Path(args.state_dir or settings.get("state_dir") or defaults.AGENT_STATE_DIR))
    run = RunSettings(metrics_interval=float(interval) if interval is not None else None)
    if "docker_socket" in settings:
        run.docker_socket = str(settings["docker_socket"])
    run.allow_mount_paths = tuple(settings.get("allow_mount_paths", ()))  # type: ignore[arg-type]
    return files, run


FirstBootAttempt = Callable[[Path], Awaitable[int]]


async def wait_for_join(
    files: AgentFiles,
    poll: float = JOIN_POLL_SECONDS,
    first_boot: Path | None = None,
    attempt: FirstBootAttempt | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> Enrollment:
    """The enrollment, once `picoord-agent join` has written it, or a first-boot file
    (`first_boot`, tried with `attempt`) has been used. Meanwhile the unit is active
    (READY=1, the watchdog fed) and its status line says what to do, so an agent installed
    and enabled before its join neither fails nor restarts in a loop; the join needs no
    restart after it."""
    from picoord.agent.first_boot import EXIT_RETRY, next_retry_delay

    said = ""
    retry_at, delay = 0.0, None
    while True:
        try:
            return files.load()
        except NotEnrolled as error:
            message = str(error)
        if first_boot is not None and attempt is not None and clock() >= retry_at and first_boot.exists():
            status = await attempt(first_boot)
            # A kept file waits with backoff; a file that could not be deleted is not retried hot.
            delay = next_retry_delay(delay if status == EXIT_RETRY else None)
            retry_at = clock() + delay
            continue
        if message != said:  # once per new reason, not every poll
            log.warning("waiting for join", reason=message)
            notify(f"STATUS={message}")
            said = message
        notify("READY=1")
        await asyncio.sleep(poll)


def cmd_run(args: argparse.Namespace, settings: dict[str, object]) -> int:
    from picoord.agent.session import AgentRunner  # keeps `join` light

    files, run = run_settings(args, settings)
    check_state_dir(files.state_dir)
    # Before anything else (enrolled or not): a firewall change a previous run left
    # unconfirmed is armed again for the rest of its window, or goes back now. The firewall
    # modules load only then: a node's agent is kept small.
    if (files.state_dir / FIREWALL_REVERT_FILE).exists():
        from picoord.agent.actions.firewall.watchdog import rearm_on_start

        done = rearm_on_start(files.state_dir)
        if done:
            log.warning("firewall revert", detail=done)
    first_boot = first_boot_file(settings)
    if not args.wait_for_join and not first_boot.exists():
        files.load()  # not enrolled: exits 1 with the fix, before anything starts

    async def attempt(path: Path) -> int:
        from picoord.agent.first_boot import attempt_in_child

        return await attempt_in_child(path, files.state_dir, args.config, args.log_level)

    async def main() -> None:
        watchdog = asyncio.create_task(feed_watchdog())  # systemd's WatchdogSec=: the loop is alive
        loop = asyncio.get_running_loop()
        current = asyncio.current_task()
        assert current is not None
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, current.cancel)
        try:
            enrollment = await wait_for_join(files, first_boot=first_boot, attempt=attempt)
            runner = AgentRunner(files, run)
            node, coordinator = enrollment.node_name, enrollment.coordinator
            log.info("agent starting", version=VERSION, node=node, coordinator=coordinator)
            # systemd (Type=notify): running; the session itself says when it is connected.
            notify(f"READY=1\nSTATUS=node {node}, connecting to {coordinator}")
            await runner.run_forever()
        except asyncio.CancelledError:
            log.info("agent stopping")
        finally:
            notify("STOPPING=1")
            watchdog.cancel()

    asyncio.run(main())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="picoord-agent", description="The picoord node agent.")
    parser.add_argument("--config", type=Path, help=f"settings file (default {defaults.AGENT_CONFIG})")
    parser.add_argument("--log-level", choices=LOG_LEVELS)
    parser.add_argument("--version", action="version", version=f"picoord-agent {VERSION}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    join_parser = commands.add_parser("join", help="enroll this node with a coordinator")
    join_parser.add_argument("coordinator", metavar="HOST:PORT", help="the coordinator's agent endpoint")
    join_parser.add_argument("--token", help="bootstrap token from `coordctl token create`")
    join_parser.add_argument("--token-file", help="read the token from this file instead")
    join_parser.add_argument("--ca-cert-hash", required=True, help="sha256:<hex> pin of the cluster CA")
    join_parser.add_argument("--node-name", help="DNS label naming this node (default: the hostname)")
    join_parser.add_argument(
        "--label",
        action="append",
        default=[],
        metavar="k=v",
        help="a label to ask for (repeatable); it selects the node once an operator accepts it",
    )
    join_parser.add_argument("--enroll-port", type=int, help="enrollment port (default: PORT + 1)")
    join_parser.add_argument(
        "--state-dir", help=f"where the key and certificate go ({defaults.AGENT_STATE_DIR})"
    )
    join_parser.add_argument("--force", action="store_true", help="replace an existing enrollment")
    join_parser.set_defaults(handler=cmd_join)

    first_boot_parser = commands.add_parser(
        "first-boot",
        help="join once with the first-boot file (picoord-join.toml on the boot partition), then delete it",
    )
    first_boot_parser.add_argument(
        "--file",
        help="the file (default: agent.toml's first_boot_file, else /boot/firmware/picoord-join.toml)",
    )
    first_boot_parser.add_argument(
        "--state-dir", help=f"where the key and certificate go ({defaults.AGENT_STATE_DIR})"
    )
    first_boot_parser.set_defaults(handler=cmd_first_boot)

    check_parser = commands.add_parser("check", help="list what this node lacks to run workloads and actions")
    check_parser.add_argument("-o", "--output", choices=("table", "json"), default="table")
    check_parser.set_defaults(handler=cmd_check)

    run_parser = commands.add_parser("run", help="run the agent (what the systemd unit starts)")
    run_parser.add_argument("--state-dir", help=f"enrollment state ({defaults.AGENT_STATE_DIR})")
    run_parser.add_argument("--metrics-interval", type=float, help="seconds between samples (1-3600)")
    run_parser.add_argument(
        "--wait-for-join",
        action="store_true",
        help="not enrolled yet: wait for `picoord-agent join` instead of exiting (the systemd unit)",
    )
    run_parser.set_defaults(handler=cmd_run)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        settings = load_config(args.config or defaults.AGENT_CONFIG, required=args.config is not None)
        configure_logging(args.log_level or str(settings.get("log_level", "info")))
        raise SystemExit(args.handler(args, settings))
    except (ConfigFileError, UnsafeStateDir) as error:
        # Only the operator can fix these: systemd does not restart on this status.
        print(f"picoord-agent: {error}", file=sys.stderr)
        raise SystemExit(defaults.EXIT_CONFIG) from None
    except (UsageError, InvalidToken, InvalidCaHash, InvalidName, InvalidAddress) as error:
        print(f"picoord-agent: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    except (JoinError, NotEnrolled, OSError) as error:
        print(f"picoord-agent: {error}", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
