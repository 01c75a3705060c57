"""Default ports and paths, as fixed by the design card (override by flag or config file)."""

from pathlib import Path

AGENT_PORT = 7443
METRICS_PORT = 9469
COORDINATOR_LISTEN = f"0.0.0.0:{AGENT_PORT}"
METRICS_LISTEN = f"0.0.0.0:{METRICS_PORT}"
ADMIN_SOCKET = Path("/run/picoord/admin.sock")
ADMIN_SOCKET_ENV = "COORDCTL_ADMIN_SOCKET"
COORDINATOR_STATE_DIR = Path("/var/lib/picoord")
AGENT_STATE_DIR = Path("/var/lib/picoord/agent")
COORDINATOR_CONFIG = Path("/etc/picoord/coordinator.toml")
AGENT_CONFIG = Path("/etc/picoord/agent.toml")
DOCKER_SOCKET = "/var/run/docker.sock"  # dockerd's own default; agent.toml's docker_socket overrides it

TOKEN_TTL_SECONDS = 24 * 3600
METRICS_INTERVAL_SECONDS = 5.0
MIN_METRICS_INTERVAL_SECONDS = 1.0

# The coordinator's server certificate is issued to this name and agents check it instead
# of the address they dial: home labs move between DHCP addresses, and trust comes from
# the pinned CA. A node may therefore never enroll under this name.
COORDINATOR_SERVER_NAME = "picoord-coordinator"

# `picoord-agent join` reads the token from here when --token is not given, which keeps it
# out of `ps` and shell history.
JOIN_TOKEN_ENV = "PICOORD_JOIN_TOKEN"

# The exit status of both daemons for a problem a restart cannot fix: a bad config file or
# flag, an unsafe state directory, a cluster CA that is half gone. sysexits.h's EX_CONFIG;
# systemd shows it as status=78/CONFIG, and both units name it in RestartPreventExitStatus=,
# so the unit stays failed (the journal says what to fix) rather than restart in a loop.
EXIT_CONFIG = 78
