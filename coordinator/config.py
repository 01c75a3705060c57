"""Coordinator settings: defaults, then /etc/picoord/coordinator.toml, then flags."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, fields
from pathlib import Path

from picoord.common import defaults
from picoord.common.addresses import InvalidAddress, join_host_port, split_host_port
from picoord.common.durations import InvalidDuration, parse_duration


class ConfigError(ValueError):
    pass


CERT_VALIDITY_MIN = 30.0
CERT_VALIDITY_MAX = 3650 * 86400.0


@dataclass
class CoordinatorConfig:
    listen: str = defaults.COORDINATOR_LISTEN
    enroll_listen: str = ""  # empty: the agent port + 1 on the same host
    admin_socket: str = str(defaults.ADMIN_SOCKET)
    metrics_listen: str = defaults.METRICS_LISTEN
    state_dir: str = str(defaults.COORDINATOR_STATE_DIR)
    advertise_address: str = ""  # what join commands name; empty: this host's name
    heartbeat_timeout: float = 20.0
    down_timeout: float = 60.0
    metrics_interval: float = defaults.METRICS_INTERVAL_SECONDS
    heartbeat_interval: float = 0.0  # 0: a quarter of heartbeat_timeout, at most 5 s
    metrics_history: int = 120
    log_level: str = "info"
    log_json: bool | None = None
    # Certificate lifetimes in seconds (a duration such as "90d" in the file): both rotate
    # at about two thirds of their life, so tests can use a minute or less.
    node_cert_validity: float = 365 * 86400.0
    server_cert_validity: float = 365 * 86400.0

    @classmethod
    def load(cls, path: Path | None, required: bool) -> CoordinatorConfig:
        config = cls()
        if path is None or not path.exists():
            if required:
                raise ConfigError(f"config file {path} does not exist")
            return config
        try:
            values = tomllib.loads(path.read_text())
        except (OSError, tomllib.TOMLDecodeError) as error:
            raise ConfigError(f"cannot read {path}: {error}") from None
        known = {field.name: field for field in fields(cls)}
        for key, value in values.items():
            name = key.replace("-", "_")
            if name not in known:
                raise ConfigError(f"{path}: unknown setting {key!r} (known: {', '.join(sorted(known))})")
            setattr(config, name, value)
        return config

    def validate(self) -> None:
        try:
            for name in ("listen", "metrics_listen"):
                split_host_port(getattr(self, name), name)
            if self.enroll_listen:
                split_host_port(self.enroll_listen, "enroll_listen")
        except InvalidAddress as error:
            raise ConfigError(str(error)) from None
        if not self.metrics_interval >= defaults.MIN_METRICS_INTERVAL_SECONDS:
            raise ConfigError(f"metrics_interval must be at least {defaults.MIN_METRICS_INTERVAL_SECONDS} s")
        if not 0 < self.heartbeat_timeout <= self.down_timeout:
            raise ConfigError("heartbeat_timeout must be positive and at most down_timeout")
        if not self.heartbeat_interval:
            self.heartbeat_interval = min(5.0, self.heartbeat_timeout / 4)
        if not 0 < self.heartbeat_interval < self.heartbeat_timeout:
            raise ConfigError("heartbeat_interval must be positive and shorter than heartbeat_timeout")
        if self.metrics_history < 2:
            raise ConfigError("metrics_history must be at least 2")
        self._validate_cert_lifetimes()

    def _validate_cert_lifetimes(self) -> None:
        for name in ("node_cert_validity", "server_cert_validity"):
            value = getattr(self, name)
            try:
                seconds = parse_duration(value) if isinstance(value, str) else float(value)
            except (InvalidDuration, TypeError, ValueError):
                raise ConfigError(f"{name} must be a duration such as 90s, 2m, 24h or 365d") from None
            if not CERT_VALIDITY_MIN <= seconds <= CERT_VALIDITY_MAX:
                raise ConfigError(f"{name} must be between 30s and 3650d (the CA's own life)")
            setattr(self, name, seconds)

    def enroll_address(self) -> str:
        if self.enroll_listen:
            return self.enroll_listen
        host, port = split_host_port(self.listen, "listen")
        return join_host_port(host, port + 1)
