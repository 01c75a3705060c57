"""Field validators for node actions, used at both ends: by the coordinator when it reads a
spec file, and by the agent on every action it receives, before anything runs.

Each validator returns the normalised value or raises FieldError naming the field, so a
rejected document can say precisely what is wrong. None of them lets through a value
that could act as shell syntax or as a command-line option: executors never use a shell,
but a value starting with '-' could still be read as an option by the program.
"""

from __future__ import annotations

import ipaddress
import posixpath
import re
from collections.abc import Sequence

from picoord.common.addresses import InvalidAddress, split_host_port


class FieldError(ValueError):
    """A field with an invalid value; `field` is its path, e.g. rules[2].from."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.reason = message


# Characters no value may contain: shell syntax, quotes, whitespace, control characters.
_FORBIDDEN = re.compile(r"[\s;&|`$<>(){}\[\]\\'\"*?!#~\x00-\x1f\x7f]")
_HOSTNAME = re.compile(
    r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*"
)
_VOLUME_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_SWARM_TOKEN = re.compile(r"SWMTKN-1-[0-9a-z]{50}-[0-9a-z]{25}")
_KUBEADM_TOKEN = re.compile(r"[a-z0-9]{6}\.[a-z0-9]{16}")
_SHA256_PIN = re.compile(r"sha256:[0-9a-f]{64}")
_K3S_TOKEN = re.compile(
    r"(K10[0-9a-f]{64}::[A-Za-z0-9_.-]{1,64}:[A-Za-z0-9_.-]{1,256}|[A-Za-z0-9_.-]{8,256})"
)
_MOUNT_OPTION = re.compile(r"[A-Za-z0-9_.:/=,+@-]{1,256}")

# Mount paths (targets and bind sources; gluster bricks too). Two layers:
# - everywhere (the coordinator's checks and the agent's): never / itself, never in or under
#   /proc, /sys or /dev, and never over a system tree below or any directory holding one
#   (/etc, /var, /var/lib): nothing in a node's config can allow those;
# - on the node, where the agent knows its config: nothing under a system tree (nor under
#   the agent's own state dir) unless agent.toml's allow_mount_paths names that path or a
#   directory above it.
MOUNT_NEVER_UNDER = ("/proc", "/sys", "/dev")
SYSTEM_TREES = (
    "/etc",
    "/boot",
    "/usr",
    "/bin",
    "/sbin",
    "/lib",
    "/lib32",
    "/lib64",
    "/libx32",
    "/run",
    "/var/lib/picoord",
    "/var/lib/docker",
    "/var/lib/containerd",
    "/var/lib/glusterd",
    "/var/lib/kubelet",
    "/var/lib/etcd",
    "/var/lib/rancher",
    "/var/lib/dpkg",
    "/var/lib/apt",
)


def within(path: str, tree: str) -> bool:
    """`path` is `tree` or below it (by whole components: /etcetera is not under /etc)."""
    return path == tree or path.startswith(tree.rstrip("/") + "/")


def mount_path_refusal(
    path: str, *, node: bool, allowed: Sequence[str] = (), extra_trees: Sequence[str] = ()
) -> tuple[str, str] | None:
    """Why a normalised absolute path must not be mounted over or bound from: ("over",
    path) or ("under", tree); None when it may. `node`: apply the node's layer too, with
    its `allowed` paths and `extra_trees` (the agent's state dir)."""
    trees = (*SYSTEM_TREES, *extra_trees)
    if path == "/" or any(within(tree, path) for tree in (*MOUNT_NEVER_UNDER, *trees)):
        return ("over", path)
    for tree in MOUNT_NEVER_UNDER:
        if within(path, tree):
            return ("under", tree)
    if not node or any(within(path, allow) for allow in allowed):
        return None
    for tree in trees:
        if within(path, tree):
            return ("under", tree)
    return None


def safe_word(field: str, value: str, max_length: int = 256) -> str:
    """A value that becomes one argv element: no shell syntax, not an option."""
    if not isinstance(value, str) or not value:
        raise FieldError(field, "must be a non-empty string")
    if len(value) > max_length:
        raise FieldError(field, f"longer than {max_length} characters")
    if value.startswith("-"):
        raise FieldError(field, f"{value!r} starts with '-' and would be read as an option")
    match = _FORBIDDEN.search(value)
    if match:
        raise FieldError(field, f"{value!r} contains {match.group()!r}, which is not allowed")
    return value


def cidr(field: str, value: str) -> str:
    """An IPv4 or IPv6 network in CIDR form (a bare address means a single host)."""
    safe_word(field, value, 64)
    try:
        return str(ipaddress.ip_network(value, strict=True))
    except ValueError as error:
        raise FieldError(field, f"{value!r} is not a valid CIDR ({error})") from None


def ip_address(field: str, value: str) -> str:
    safe_word(field, value, 64)
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        raise FieldError(field, f"{value!r} is not an IP address") from None


def port(field: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise FieldError(field, f"{value!r} is not a port number")
    if not 1 <= value <= 65535:
        raise FieldError(field, f"port {value} is outside 1-65535")
    return value


def port_range(field: str, first: object, last: object) -> tuple[int, int]:
    low, high = port(field, first), port(field, last)
    if low > high:
        raise FieldError(field, f"range {low}:{high} is inverted")
    return low, high


def hostname(field: str, value: str) -> str:
    """A DNS name or an IP address, as used to reach another node."""
    safe_word(field, value, 253)
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        pass
    if not _HOSTNAME.fullmatch(value):
        raise FieldError(field, f"{value!r} is not a host name or IP address")
    return value


def host_port(field: str, value: str, default_port: int | None = None) -> str:
    """HOST:PORT (or HOST alone when a default port is given)."""
    safe_word(field, value, 260)
    text = value
    if default_port is not None and (
        ":" not in value or (value.count(":") > 1 and not value.startswith("["))
    ):
        text = f"[{value}]:{default_port}" if ":" in value else f"{value}:{default_port}"
    try:
        host, number = split_host_port(text, field)
    except InvalidAddress as error:
        raise FieldError(field, str(error)) from None
    hostname(field, host)
    port(field, number)
    return f"[{host}]:{number}" if ":" in host else f"{host}:{number}"


def absolute_path(field: str, value: str) -> str:
    """An absolute, normalised path with no '..' tricks."""
    safe_word(field, value, 1024)
    if not value.startswith("/"):
        raise FieldError(field, f"{value!r} is not an absolute path")
    normalised = posixpath.normpath(value)
    if normalised.startswith("//"):
        normalised = "/" + normalised.lstrip("/")
    return normalised


def outside_system_directories(
    field: str,
    value: str,
    over: str,
    under: str,
    *,
    node: bool = True,
    allowed: Sequence[str] = (),
    extra_trees: Sequence[str] = (),
) -> str:
    """An absolute path that `mount_path_refusal` lets through (see the rules above it).

    `over` and `under` word the refusal, e.g. "mount over {path}", "mount under {tree}"."""
    path = absolute_path(field, value)
    refusal = mount_path_refusal(path, node=node, allowed=allowed, extra_trees=extra_trees)
    if refusal is None:
        return path
    kind, where = refusal
    if kind == "over":
        raise FieldError(field, "refusing to " + over.format(path=path))
    why = "" if where in MOUNT_NEVER_UNDER else "; a node may allow it with allow_mount_paths in agent.toml"
    shown = f" ({value!r} resolves to {path})" if value != path else f" ({path})"
    raise FieldError(field, "refusing to " + under.format(tree=where) + shown + why)


def mount_target(
    field: str,
    value: str,
    *,
    node: bool = False,
    allowed: Sequence[str] = (),
    extra_trees: Sequence[str] = (),
) -> str:
    """A mount target; `node=True` on the agent (see `mount_path_refusal`)."""
    return outside_system_directories(
        field,
        value,
        "mount over {path}",
        "mount under {tree}",
        node=node,
        allowed=allowed,
        extra_trees=extra_trees,
    )


def bind_source(
    field: str,
    value: str,
    *,
    node: bool = False,
    allowed: Sequence[str] = (),
    extra_trees: Sequence[str] = (),
) -> str:
    """A bind mount's source directory: the same rules as a target (binding /etc or the
    agent's state elsewhere exposes it there)."""
    return outside_system_directories(
        field,
        value,
        "bind-mount {path}",
        "bind-mount from under {tree}",
        node=node,
        allowed=allowed,
        extra_trees=extra_trees,
    )


def remote_path(field: str, value: str) -> tuple[str, str]:
    """HOST:/path, as in glusterfs and nfs sources and gluster bricks."""
    safe_word(field, value, 1024)
    host, sep, path = value.partition(":")
    if not sep or not path:
        raise FieldError(field, f"{value!r} is not HOST:/path")
    return hostname(field, host), absolute_path(field, path)


def volume_name(field: str, value: str) -> str:
    safe_word(field, value, 64)
    if not _VOLUME_NAME.fullmatch(value):
        raise FieldError(field, f"{value!r} is not a volume name (letters, digits, '_', '.', '-')")
    return value


def mount_option(field: str, value: str) -> str:
    safe_word(field, value, 256)
    if not _MOUNT_OPTION.fullmatch(value):
        raise FieldError(field, f"{value!r} is not a mount option")
    return value


def swarm_token(field: str, value: str) -> str:
    if not isinstance(value, str) or not _SWARM_TOKEN.fullmatch(value):
        raise FieldError(field, "not a Docker Swarm join token (SWMTKN-1-<50>-<25>)")
    return value


def kubeadm_token(field: str, value: str) -> str:
    if not isinstance(value, str) or not _KUBEADM_TOKEN.fullmatch(value):
        raise FieldError(field, "not a kubeadm token ([a-z0-9]{6}.[a-z0-9]{16})")
    return value


def sha256_pin(field: str, value: str) -> str:
    if not isinstance(value, str) or not _SHA256_PIN.fullmatch(value):
        raise FieldError(field, "not sha256:<64 hex digits>")
    return value


def k3s_token(field: str, value: str) -> str:
    if not isinstance(value, str) or value.startswith("-") or not _K3S_TOKEN.fullmatch(value):
        raise FieldError(field, "not a k3s token (K10<hash>::<user>:<secret>, or 8-256 safe characters)")
    return value


def https_url(field: str, value: str) -> str:
    """https://HOST:PORT, as k3s wants its server."""
    safe_word(field, value, 300)
    if not value.startswith("https://"):
        raise FieldError(field, f"{value!r} must start with https://")
    host_port(field, value[len("https://") :].rstrip("/"))
    return value.rstrip("/")


# Docker's reference grammar (distribution/reference): [registry[:port]/]path[:tag][@sha256:digest].
_DOMAIN_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
_REGISTRY = rf"(?:{_DOMAIN_LABEL}(?:\.{_DOMAIN_LABEL})*|\[[0-9a-fA-F:]+\])(?::[0-9]{{1,5}})?"
_PATH_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_IMAGE = re.compile(
    rf"^(?:(?P<registry>{_REGISTRY})/)?(?P<path>{_PATH_COMPONENT}(?:/{_PATH_COMPONENT})*)"
    r"(?::(?P<tag>[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}))?(?:@(?P<digest>sha256:[a-f0-9]{64}))?$"
)
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]{0,255}$")


def env_name(field: str, value: object) -> str:
    """An environment variable's name as Docker and Kubernetes take it."""
    if not isinstance(value, str) or not _ENV_NAME.fullmatch(value):
        raise FieldError(field, f"{value!r} is not an environment variable name")
    return value


def image_reference(field: str, value: object) -> str:
    """A validated image reference; without tag or digest it means `:latest`, as Docker reads it."""
    if not isinstance(value, str) or not value:
        raise FieldError(field, "an image reference is required")
    if len(value) > 512:
        raise FieldError(field, "an image reference is at most 512 characters")
    if re.search(r"\s", value):
        raise FieldError(field, f'"{value}" is not an image reference (it contains whitespace)')
    match = _IMAGE.fullmatch(value)
    if not match:
        raise FieldError(
            field,
            f'"{value}" is not an image reference (use [registry[:port]/]path[:tag] or path@sha256:<digest>, '
            "the path in lowercase)",
        )
    if not match.group("tag") and not match.group("digest"):
        return value + ":latest"
    return value
