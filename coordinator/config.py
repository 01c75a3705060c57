"""Coordinator settings: defaults, then /etc/picoord/coordinator.toml, then flags."""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

from picoord.common import defaults, limits
from picoord.common.addresses import InvalidAddress, join_host_port, split_host_port
from picoord.common.configfile import ConfigFileError, fix_hint, read_settings, where
from picoord.common.durations import InvalidDuration, parse_duration
from picoord.common.logs import LEVELS as LOG_LEVELS
from picoord.coordinator.advertise import InvalidAdvertiseAddress, check_advertise_syntax

SERVICE = "picoord-coordinator"


class ConfigError(ConfigFileError):
    """A bad setting, from the file or a flag (the daemon exits EXIT_CONFIG)."""


def _type_refusal(value: object, default: object) -> str | None:
    """Why a value from the file cannot stand for a setting whose default is `default`."""
    if isinstance(default, bool) or default is None:  # log_json: true, false or unset
        return None if isinstance(value, bool) else "must be true or false"
    if isinstance(default, (int, float)):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return "must be a number"
        if isinstance(default, int) and not isinstance(default, float) and not isinstance(value, int):
            return "must be a whole number"
        return None
    return None if isinstance(value, str) else "must be a string in quotes"


DURATION_SETTINGS = ("node_cert_validity", "server_cert_validity")
MAX_HEARTBEAT_INTERVAL = 60.0
# An open session that carried nothing for this many heartbeat intervals is NotReady.
SILENT_INTERVALS = 3
CERT_VALIDITY_MIN = 30.0
CERT_VALIDITY_MAX = 3650 * 86400.0


@dataclass
class CoordinatorConfig:
    listen: str = defaults.COORDINATOR_LISTEN
    enroll_listen: str = ""  # empty: the agent port + 1 on the same host
    admin_socket: str = str(defaults.ADMIN_SOCKET)
    # Remote admin (coordctl from another machine): HOST:PORT of a mutual-TLS listener that
    # takes admin certificates only (`coordctl admin issue`); empty: off.
    admin_listen: str = ""
    metrics_listen: str = defaults.METRICS_LISTEN
    state_dir: str = str(defaults.COORDINATOR_STATE_DIR)
    # What join commands name: empty, the listen address if specific, else the address of
    # the default-route interface (coordinator/advertise.py, docs/join.md).
    advertise_address: str = ""
    # A cut link or a frozen agent ends its session within this (HTTP/2 keepalive pings that
    # gRPC's core sends and times out): with the 5 s disconnect grace, replicas move within ~9 s.
    heartbeat_timeout: float = 3.0
    down_timeout: float = 60.0
    metrics_interval: float = defaults.METRICS_INTERVAL_SECONDS
    # An agent sends a message at least this often (samples count, so at the default no
    # heartbeat is sent at all); 0: the metrics interval. An open session silent for three
    # of these (an agent whose loop hangs while its gRPC core answers pings) is NotReady.
    heartbeat_interval: float = 0.0
    metrics_history: int = 120
    log_level: str = "info"
    log_json: bool | None = None
    # The front door: a connection must finish its TLS handshake within handshake_timeout
    # seconds; each agent port holds at most max_connections (0: as many as the open-files
    # limit allows after a reserve that keeps the admin socket answering).
    handshake_timeout: float = 5.0
    max_connections: int = 0
    # A source address with enroll_max_failures refused enrollments within
    # enroll_failure_window seconds is refused unchecked for enroll_ban seconds.
    enroll_max_failures: int = 10
    enroll_failure_window: float = 60.0
    enroll_ban: float = 60.0
    # A node whose session is gone longer than this has its replicas replaced elsewhere
    # (Nomad's disconnect.lost_after); shorter outages replace nothing.
    disconnect_grace: float = limits.DISCONNECT_GRACE
    # Certificate lifetimes in seconds (a duration such as "90d" in the file): both rotate
    # at about two thirds of their life, so tests can use a minute or less.
    node_cert_validity: float = 365 * 86400.0
    server_cert_validity: float = 365 * 86400.0

    @classmethod
    def load(cls, path: Path | None, required: bool) -> CoordinatorConfig:
        """Defaults, then the file's settings, each checked for its type (the values
        themselves are checked by validate); an error names the file, line and setting."""
        config = cls()
        if path is None:
            return config
        try:
            values, text = read_settings(path, required, SERVICE)
        except ConfigFileError as error:
            raise ConfigError(str(error)) from None
        known = {field.name: field for field in fields(cls)}
        for key, value in values.items():
            name = key.replace("-", "_")
            if name not in known:
                raise ConfigError(
                    f"{where(path, text, key)}: unknown setting {key!r} (known: {', '.join(sorted(known))}): "
                    + fix_hint(path, SERVICE)
                )
            # The certificate lifetimes also take a duration such as "90d" (checked in validate).
            duration = name in DURATION_SETTINGS and isinstance(value, str)
            refusal = None if duration else _type_refusal(value, getattr(config, name))
            if refusal:
                shown = f"{key} = {str(value)[:80]!r}"
                raise ConfigError(f"{where(path, text, key)}: {shown} {refusal}: {fix_hint(path, SERVICE)}")
            setattr(config, name, value)
            config.file_settings[name] = where(path, text, key)
        return config

    @property
    def file_settings(self) -> dict[str, str]:
        """Setting -> `PATH line N` for those the file set: validate's errors name the line."""
        if "_file_settings" not in self.__dict__:
            self.__dict__["_file_settings"] = {}
        return self.__dict__["_file_settings"]

    def located(self, error: ConfigError, flags: set[str]) -> ConfigError:
        """validate's `error`, naming the file and line of the first setting it is about that
        came from the file (not from a flag), with the fix."""
        message = str(error)
        named = [name for name in self.file_settings if name in message and name not in flags]
        if named:
            place = self.file_settings[min(named, key=message.index)]
            path = Path(place.split(" line ")[0])
            return ConfigError(f"{place}: {error}: {fix_hint(path, SERVICE)}")
        return ConfigError(f"{error} (from a flag: see `systemctl cat {SERVICE}`)" if flags else str(error))

    def validate(self) -> None:
        try:
            for name in ("listen", "metrics_listen"):
                split_host_port(getattr(self, name), name)
            if self.enroll_listen:
                split_host_port(self.enroll_listen, "enroll_listen")
            if self.admin_listen:
                split_host_port(self.admin_listen, "admin_listen")
        except InvalidAddress as error:
            raise ConfigError(str(error)) from None
        if self.advertise_address:
            try:
                check_advertise_syntax(self.advertise_address)
            except InvalidAdvertiseAddress as error:
                raise ConfigError(str(error)) from None
        if self.log_level.strip().lower() not in LOG_LEVELS:
            raise ConfigError(f"log_level must be one of {', '.join(LOG_LEVELS)}, not {self.log_level!r}")
        if not self.metrics_interval >= defaults.MIN_METRICS_INTERVAL_SECONDS:
            raise ConfigError(f"metrics_interval must be at least {defaults.MIN_METRICS_INTERVAL_SECONDS} s")
        if not 0 < self.heartbeat_timeout <= self.down_timeout:
            raise ConfigError("heartbeat_timeout must be positive and at most down_timeout")
        if not self.heartbeat_interval:
            self.heartbeat_interval = self.metrics_interval
        if not 0 < self.heartbeat_interval <= MAX_HEARTBEAT_INTERVAL:
            raise ConfigError(
                f"heartbeat_interval must be positive and at most {MAX_HEARTBEAT_INTERVAL:g} seconds"
            )
        if not 0 < self.disconnect_grace <= 3600:
            raise ConfigError("disconnect_grace must be between 0 and 3600 seconds")
        if self.metrics_history < 2:
            raise ConfigError("metrics_history must be at least 2")
        if not 0 < self.handshake_timeout <= 120:
            raise ConfigError("handshake_timeout must be more than 0 and at most 120 seconds")
        if self.max_connections < 0:
            raise ConfigError("max_connections must be 0 (from the open-files limit) or more")
        if self.enroll_max_failures < 1:
            raise ConfigError("enroll_max_failures must be at least 1")
        if not (self.enroll_failure_window > 0 and self.enroll_ban > 0):
            raise ConfigError("enroll_failure_window and enroll_ban must be positive")
        self._validate_cert_lifetimes()

    def _validate_cert_lifetimes(self) -> None:
        for name in DURATION_SETTINGS:
            value = getattr(self, name)
            try:
                seconds = parse_duration(value) if isinstance(value, str) else float(value)
            except (InvalidDuration, TypeError, ValueError):
                raise ConfigError(f"{name} must be a duration such as 90s, 2m, 24h or 365d") from None
            if not CERT_VALIDITY_MIN <= seconds <= CERT_VALIDITY_MAX:
                raise ConfigError(f"{name} must be between 30s and 3650d (the CA's own life)")
            setattr(self, name, seconds)

    @property
    def working_timeout(self) -> float:
        """Seconds an open session may carry nothing before its node is NotReady: the agent's
        own sign that it is alive and working (a gone link or process is the keepalive's,
        within heartbeat_timeout). Never shorter than heartbeat_timeout, never past Down."""
        return min(self.down_timeout, max(self.heartbeat_timeout, SILENT_INTERVALS * self.heartbeat_interval))

    def enroll_address(self) -> str:
        if self.enroll_listen:
            return self.enroll_listen
        host, port = split_host_port(self.listen, "listen")
        return join_host_port(host, port + 1)


def load_settings(path: Path | None, flags: dict[str, object]) -> CoordinatorConfig:
    """The coordinator's settings as the daemon takes them: defaults, then the file at
    `path` (the default file, optional, when None), then the flags given (None: not
    given), validated; a ConfigError names the file and line or the flag."""
    config = CoordinatorConfig.load(path or defaults.COORDINATOR_CONFIG, required=path is not None)
    given = {name for name, value in flags.items() if value is not None}
    for name in given:
        setattr(config, name, flags[name])
    try:
        config.validate()
    except ConfigError as error:
        raise config.located(error, given) from None
    return config
