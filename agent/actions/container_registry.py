"""Registry executors: this node serves the cluster's container registry over TLS, and this
node's dockerd trusts it.

Serving: Debian's docker-registry with its own config, /etc/docker/registry/picoord.yml
(Debian's config.yml, a conffile, is left alone), the coordinator-issued certificate and
key beside it, and a systemd drop-in pointing docker-registry.service at that config. The
key is the one secret: mode 0640, group docker-registry (the daemon's user), never logged.
Where systemd runs the service is started or restarted on a change; without it (a lab Pi)
nothing is started and the message says the files take effect when the registry starts.

Trusting: the cluster CA in /etc/docker/certs.d/HOST:PORT/ca.crt for each name the
registry is pulled by. dockerd reads that directory at every pull, so no restart and no
`insecure-registries`. The same files again are UNCHANGED. The file contents are the pure
`registry_config`, `service_drop_in` and `trust_files`, table-tested.
"""

from __future__ import annotations

import grp
import os
import pwd
import shutil
from collections.abc import Sequence
from pathlib import Path

from picoord.agent.actions.base import ActionContext, ActionFailed, Outcome, read_file
from picoord.agent.actions.chrony import daemon_commands
from picoord.agent.actions.mount import SYSTEMD_RUNNING, record_file_change, write_file
from picoord.common.checks.registry import addresses, check_registry_server, check_registry_trust
from picoord.v1 import actions_pb2

CONF_DIR = Path("/etc/docker/registry")
CONFIG = CONF_DIR / "picoord.yml"
CERTIFICATE = CONF_DIR / "picoord-registry.crt"
KEY = CONF_DIR / "picoord-registry.key"
DROP_IN = Path("/etc/systemd/system/docker-registry.service.d/picoord.conf")
CERTS_DIR = Path("/etc/docker/certs.d")
SERVICE = "docker-registry"
REGISTRY_USER = "docker-registry"  # Debian's package runs the daemon as this user
MARKER = "# picoord: written by the picoord agent, which edits or removes only files carrying this line"
COMMAND_TIMEOUT = 30.0


def registry_config(port: int, storage: str, certificate: Path = CERTIFICATE, key: Path = KEY) -> str:
    """docker-registry's YAML: filesystem storage, TLS on every address at `port`."""
    return (
        f"{MARKER}\n"
        "version: 0.1\n"
        "log:\n  level: info\n"
        f"storage:\n  filesystem:\n    rootdirectory: {storage}\n"
        f"http:\n  addr: :{port}\n  tls:\n    certificate: {certificate}\n    key: {key}\n"
    )


def service_drop_in(config: Path = CONFIG) -> str:
    """docker-registry.service started with picoord's config instead of Debian's."""
    return f"{MARKER}\n[Service]\nExecStart=\nExecStart=/usr/bin/docker-registry serve {config}\n"


def trust_files(certs_dir: Path, names: Sequence[str], ca_pem: str) -> list[tuple[Path, str]]:
    """(path, content) for each name the registry is pulled by: dockerd's certs.d layout."""
    return [(certs_dir / name / "ca.crt", ca_pem) for name in names]


def _owner() -> tuple[int, int] | None:
    """(uid, gid) of the registry's user, when Debian's package made it."""
    try:
        return pwd.getpwnam(REGISTRY_USER).pw_uid, grp.getgrnam(REGISTRY_USER).gr_gid
    except KeyError:
        return None


def _write(path: Path, text: str, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_file(path, text, mode=mode)


def _write_key(text: str) -> None:
    _write(KEY, text, mode=0o600)
    owner = _owner()
    if owner is not None:
        os.chown(KEY, 0, owner[1])
        os.chmod(KEY, 0o640)
    else:
        os.chmod(KEY, 0o600)


def _make_storage(path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True)
    owner = _owner()
    if owner is not None:
        os.chown(path, *owner)


def registry_server(request: actions_pb2.RegistryServer, context: ActionContext) -> Outcome:
    check_registry_server(request)
    context.secrets = (*context.secrets, request.key_pem)
    if shutil.which(SERVICE) is None:
        raise ActionFailed(f"{SERVICE} is not installed here: apt-get install docker-registry")
    storage = Path(request.storage)
    systemd = SYSTEMD_RUNNING.is_dir()
    files = [
        (CERTIFICATE, request.certificate_pem, "the server certificate (cluster CA)"),
        (
            CONFIG,
            registry_config(request.port, request.storage, CERTIFICATE, KEY),
            f"TLS on port {request.port}",
        ),
    ]
    if systemd:
        files.append((DROP_IN, service_drop_in(CONFIG), f"{SERVICE}.service serves {CONFIG}"))
    written, changed = False, set[Path]()
    if not storage.is_dir():
        record_file_change(context, "mkdir", storage, "the image store", lambda: _make_storage(storage))
        written = True
    for path, text, detail in files:
        if read_file(path) != text:
            record_file_change(context, "write", path, detail, lambda p=path, t=text: _write(p, t))
            written = True
            changed.add(path)
    if read_file(KEY) != request.key_pem:
        record_file_change(
            context, "write", KEY, "its key (secret, 0640)", lambda: _write_key(request.key_pem)
        )
        written = True
    active = False
    if systemd:
        if DROP_IN in changed:
            context.change(["systemctl", "daemon-reload"], COMMAND_TIMEOUT)
        active = context.read(["systemctl", "is-active", SERVICE], COMMAND_TIMEOUT).stdout.strip() == "active"
    for argv in daemon_commands(systemd, written, active, SERVICE):
        context.change(argv, COMMAND_TIMEOUT)
    what = f"{SERVICE} serves {request.storage} over TLS on port {request.port}"
    note = "" if systemd else f"; systemd does not run here: `{SERVICE} serve {CONFIG}` starts it"
    return Outcome.done(context, f"{what}{note}" if written else what, in_place=f"{CONFIG}: {what}")


def registry_trust(
    request: actions_pb2.RegistryTrust, context: ActionContext, certs_dir: Path = CERTS_DIR
) -> Outcome:
    check_registry_trust(request)
    names = addresses("registry_trust.addresses", list(request.addresses))
    for path, text in trust_files(certs_dir, names, request.ca_pem):
        if read_file(path) != text:
            record_file_change(context, "write", path, "the cluster CA", lambda p=path, t=text: _write(p, t))
    what = f"dockerd trusts the cluster registry at {', '.join(names)} (cluster CA in {certs_dir})"
    return Outcome.done(context, what, in_place=what)
