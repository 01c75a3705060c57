"""A stand-in Pi's own filesystem state: a persistent mount (and UTS) namespace per lab Pi.

Why: a network namespace gives each Pi its own addresses, but the agent's actions change
files (/etc/ufw, /etc/fstab, systemd units) and talk to daemons (dockerd, glusterd) whose
state lives in fixed paths. Without isolation, three "Pis" would share one /etc/ufw, one
/var/lib/docker and one glusterd UUID, and a test would change the host itself. A
PiSandbox adds, on top of the Pi's network namespace:

* a persistent mount namespace (a file under `root/.pisandbox-ns`, kept by a bind mount, so
  no process has to stay alive to hold it) in which the paths in PRIVATE_DIRS and
  PRIVATE_FILES are bind mounts of per-Pi copies under `root/fs/<path>`:
    - /etc/ufw, /etc/default/ufw (ufw's default policies), /etc/fstab, /etc/systemd/system,
      /etc/docker, /etc/chrony: configuration the actions edit; seeded with a copy of the host's, as a
      freshly installed Pi would have it (never /etc/docker/key.json: it carries the engine
      ID, which must differ per Pi). Single files are bind mounts too, so they can be
      rewritten in place (cp, open "w") but not replaced by rename (EBUSY);
    - /var/lib/docker, /var/lib/containerd, /run/docker, /run/containerd: one Docker
      engine (and its containerd, swarm state, images, netns files) per Pi;
    - /var/lib/glusterd (seeded with the package's hooks/ and groups/ only, so each Pi
      gets its own UUID), /var/log/glusterfs, /run/gluster: one glusterd per Pi;
    - /mnt, /srv: mount points and bricks, so a mount or brick of one Pi is not another's.
  Everything else is the host's: /tmp and the lab work dirs (logs, agent state), /usr (the
  same binaries and venv), /run/netns (so `ip netns` works inside), /dev (incl. /dev/fuse).
  The namespace is a *slave* of the host's: host mount events still propagate in (a
  namespace added or deleted under /run/netns), nothing mounted inside leaks out;
* a fresh /sys mounted from inside the Pi's network namespace (as `ip netns exec` does),
  so /sys/class/net lists the Pi's interfaces; the host's /sys/fs/cgroup is moved over so
  dockerd and runc find their cgroups;
* a UTS namespace whose hostname is the Pi's name, so Swarm lists nodes as pi1, pi2, ...;
* default client sockets: the gluster CLI only knows /var/run/glusterd.socket and the
  docker CLI and SDK default to /var/run/docker.sock, both directly under the shared /run.
  The daemons listen in private dirs (/run/gluster/glusterd.socket, /run/docker/docker.sock)
  and, once up, that socket is bind-mounted over the default path inside the Pi only (the
  host needs a file there to mount on: an empty one is created if the host has none). If a
  daemon on the host replaced that host file meanwhile, the kernel would detach these mounts
  and the default path would lead to the host's daemon: run no such daemon on the host
  while a lab runs (socket_bound() checks, bind_default_socket() repairs).

Processes in a sandbox share the host's PID namespace, so the lab can see and kill them:
destroy() kills every process whose mount namespace is the sandbox's, and their
descendants (container processes have namespaces of their own), then unmounts the
namespace files; the kernel then drops the namespace and every mount made inside it.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from picoord.agent.docker_api import CALL_ERRORS, DockerAPI, explain
from picoord.common.mountinfo import at_or_below, mount_points
from picoord.lab import netns
from picoord.lab.netns import LabError, LabNetwork, require_root, tail

NS_DIR = ".pisandbox-ns"  # under root: a private bind mount holding the namespace files
TMP_DIR = ".pisandbox-tmp"  # under root: parking place for /sys submounts while /sys is replaced
FS_DIR = "fs"  # under root: the per-Pi copies of the private paths, at their own path below
MARKER = "pisandbox.json"  # under root: name and netns, so a sweep can find the sandbox again

# Private directories, and whether the per-Pi copy starts as a copy of the host's.
PRIVATE_DIRS: tuple[tuple[str, bool], ...] = (
    ("/etc/ufw", True),
    ("/etc/systemd/system", True),
    ("/etc/docker", True),
    ("/etc/chrony", True),  # the time-source drop-in (conf.d/picoord-time.conf)
    ("/var/lib/docker", False),
    ("/var/lib/containerd", False),
    ("/run/docker", False),
    ("/run/containerd", False),
    ("/var/lib/glusterd", True),
    ("/var/log/glusterfs", False),
    ("/run/gluster", False),
    ("/mnt", False),
    ("/srv", False),
)
PRIVATE_FILES: tuple[tuple[str, bool], ...] = (("/etc/fstab", True), ("/etc/default/ufw", True))
# Host state that must not be copied into a Pi: identities and runtime state.
SEED_EXCLUDE = {
    "/etc/docker": ("key.json",),
}
SEED_ONLY = {
    "/var/lib/glusterd": ("hooks", "groups"),
}

DOCKER_SOCKET = "/run/docker/docker.sock"  # where the lab's dockerd listens, inside the Pi
DOCKER_DEFAULT_SOCKET = "/run/docker.sock"  # /var/run/docker.sock: the docker CLI's and SDK's default
GLUSTERD_SOCKET = "/run/glusterd.socket"  # where the gluster CLI looks, fixed at build time
GLUSTERD_PRIVATE_SOCKET = "/run/gluster/glusterd.socket"  # where the lab's glusterd listens
MOUNT_TIMEOUT = 15.0
STOP_TIMEOUT = 20.0  # a daemon's graceful stop (dockerd gives containers 10s)
DESTROY_TIMEOUT = 5.0  # destroy(): SIGTERM, then SIGKILL after this


def host_mount_points() -> list[str]:
    return mount_points(Path("/proc/self/mountinfo").read_text())


def _deepest_first(paths: Iterable[str]) -> list[str]:
    return sorted(set(paths), key=lambda p: (p.count("/"), p), reverse=True)


def _ns_id(path: str | Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:  # gone, or off limits (PID 1 can be)
        return None
    return (st.st_dev, st.st_ino)


def _parents() -> dict[int, int]:
    """pid -> ppid of every live process."""
    parents = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError, ValueError):
            stat = Path(f"/proc/{entry.name}/stat").read_text()
            parents[int(entry.name)] = int(stat.rpartition(")")[2].split()[1])
    return parents


def with_descendants(pids: Iterable[int]) -> set[int]:
    """`pids` and every process below them (containers run in namespaces of their own)."""
    found = set(pids)
    parents = _parents()
    changed = True
    while changed:
        changed = False
        for pid, ppid in parents.items():
            if ppid in found and pid not in found:
                found.add(pid)
                changed = True
    return found


def kill_processes(pids: Iterable[int], timeout: float) -> list[int]:
    """SIGTERM, wait up to `timeout`, SIGKILL; returns the pids still alive afterwards."""
    pids = list(pids)
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
        alive = [pid for pid in pids if netns._running(pid)]
        if not alive:
            return []
        for pid in alive:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and any(netns._running(pid) for pid in alive):
            netns._reap(alive)
            time.sleep(0.05)
    netns._reap(pids)
    return [pid for pid in pids if netns._running(pid)]


class PiSandbox:
    """One lab Pi's private mount + UTS namespace on top of its network namespace.

    `sb.argv(cmd)` runs `cmd` inside all three; create() and destroy() are idempotent."""

    docker_socket = DOCKER_SOCKET
    glusterd_socket = GLUSTERD_SOCKET
    # The fixed paths clients look at by default, each a bind mount (inside the Pi only) of
    # the Pi's own daemon socket while that daemon runs: public path -> private socket.
    default_sockets = {DOCKER_DEFAULT_SOCKET: DOCKER_SOCKET, GLUSTERD_SOCKET: GLUSTERD_PRIVATE_SOCKET}

    def __init__(self, name: str, netns: str, root: Path | str, hostname: str | None = None) -> None:
        self.name = name
        self.netns = netns
        self.root = Path(root).absolute()
        self.hostname = hostname or name

    def __repr__(self) -> str:
        return f"PiSandbox(name={self.name!r}, netns={self.netns!r}, root={str(self.root)!r})"

    # ------------------------------------------------------------------ paths

    @property
    def ns_dir(self) -> Path:
        return self.root / NS_DIR

    @property
    def mnt_ns(self) -> Path:
        return self.ns_dir / "mnt"

    @property
    def uts_ns(self) -> Path:
        return self.ns_dir / "uts"

    @property
    def net_ns(self) -> Path:
        return netns.NETNS_DIR / self.netns

    @property
    def fs_dir(self) -> Path:
        return self.root / FS_DIR

    def host_path(self, path: str | Path) -> Path:
        """Where a path seen inside the Pi lives on the host: under root/fs for private paths
        (e.g. the docker socket, to dial it from the host), unchanged for shared ones."""
        text = str(path)
        for private, _ in (*PRIVATE_DIRS, *PRIVATE_FILES):
            if at_or_below(text, private):
                return self.fs_dir / text.lstrip("/")
        return Path(text)

    def exists(self) -> bool:
        """Whether the namespace is there (its file is mounted on the host)."""
        return str(self.mnt_ns) in host_mount_points()

    # ------------------------------------------------------------------ running things inside

    def argv(self, argv: Sequence[str], cwd: str | Path | None = None) -> list[str]:
        """argv that runs `argv` inside the Pi (network, mount and UTS namespace).

        nsenter execs the program (no fork), so a Popen's pid is the program's pid. Without
        `cwd` the program starts in "/" (entering a mount namespace resets it)."""
        if isinstance(argv, str) or not argv:
            raise TypeError("argv must be a non-empty list of strings, never a shell string")
        wd = [f"--wd={cwd}"] if cwd is not None else []
        return [
            "nsenter",
            f"--net={self.net_ns}",
            f"--mount={self.mnt_ns}",
            f"--uts={self.uts_ns}",
            *wd,
            "--",
            *argv,
        ]

    def run(
        self,
        argv: Sequence[str],
        timeout: float = 30,
        env: Mapping[str, str] | None = None,
        *,
        check: bool = False,
        input: str | None = None,
        cwd: str | Path | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run a short command inside the Pi and capture its output (text)."""
        done = subprocess.run(
            self.argv(argv, cwd),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            input=input,
            stdin=None if input is not None else subprocess.DEVNULL,
            env=netns.lab_env(env),
        )
        if check and done.returncode != 0:
            raise LabError(
                f"`{' '.join(argv)}` in {self.name} exited {done.returncode}: "
                f"{(done.stderr or done.stdout).strip()[-2000:]}"
            )
        return done

    def popen(
        self, argv: Sequence[str], log_path: Path, env: Mapping[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        """Start a long-running process inside the Pi, detached (own session), output to a log."""
        return netns.popen_logged(self.argv(argv), log_path, env)

    # ------------------------------------------------------------------ create

    def create(self) -> PiSandbox:
        """Create the namespaces and private paths (idempotent; a half-made sandbox is
        destroyed and made again). Per-Pi copies already under root/fs are kept, like a
        Pi's disk across a reboot."""
        require_root()
        if not netns.namespace_exists(self.netns):
            raise LabError(f"network namespace {self.netns} does not exist: create the lab network first")
        if self.exists():
            return self
        self.destroy()  # leftovers of a half-made one
        self.root.mkdir(parents=True, exist_ok=True)
        netns.write_json(self.root / MARKER, {"name": self.name, "netns": self.netns})
        try:
            self._seed()
            self._make_namespaces()
            self._setup_inside()
        except BaseException:
            with contextlib.suppress(LabError):
                self.destroy()
            raise
        return self

    def _seed(self) -> None:
        """Per-Pi copies of the private paths, and mount points for them on the host."""
        for path, seeded in PRIVATE_DIRS:
            Path(path).mkdir(parents=True, exist_ok=True)  # e.g. /run/docker: an empty dir
            mine = self.host_path(path)
            if mine.exists():
                continue
            mine.parent.mkdir(parents=True, exist_ok=True)
            temporary = mine.with_name(f".{mine.name}.seeding")
            shutil.rmtree(temporary, ignore_errors=True)
            temporary.mkdir()
            if seeded:
                self._copy_seed(path, temporary)
            temporary.rename(mine)
        for path, seeded in PRIVATE_FILES:
            if not Path(path).exists():
                Path(path).touch()
            mine = self.host_path(path)
            if mine.exists():
                continue
            mine.parent.mkdir(parents=True, exist_ok=True)
            if seeded:
                shutil.copyfile(path, mine)
            else:
                mine.touch()

    @staticmethod
    def _copy_seed(path: str, into: Path) -> None:
        source = Path(path)
        only = SEED_ONLY.get(path)
        exclude = set(SEED_EXCLUDE.get(path, ()))
        for entry in source.iterdir():
            if (only is not None and entry.name not in only) or entry.name in exclude:
                continue
            target = into / entry.name
            if entry.is_dir() and not entry.is_symlink():
                shutil.copytree(entry, target, symlinks=True)
            else:
                shutil.copy2(entry, target, follow_symlinks=False)

    def _make_namespaces(self) -> None:
        # unshare can only keep a mount namespace in a file on a private mount: make the
        # namespace dir a private bind mount of itself.
        self.ns_dir.mkdir(parents=True, exist_ok=True)
        if str(self.ns_dir) not in host_mount_points():
            _host(["mount", "--bind", "--make-private", str(self.ns_dir), str(self.ns_dir)])
        for path in (self.mnt_ns, self.uts_ns):
            path.touch()
        # slave: host mount events (a netns added under /run/netns) still reach the Pi;
        # mounts made inside never reach the host.
        _host(
            [
                "unshare",
                f"--mount={self.mnt_ns}",
                f"--uts={self.uts_ns}",
                "--propagation",
                "slave",
                "--",
                "true",
            ]
        )

    def _mountinfo(self) -> str:
        return self.run(["cat", "/proc/self/mountinfo"], timeout=MOUNT_TIMEOUT, check=True).stdout

    def _inside(self, argv: Sequence[str]) -> None:
        self.run(argv, timeout=MOUNT_TIMEOUT, check=True)

    def _setup_inside(self) -> None:
        points = mount_points(self._mountinfo())
        # Copies of host mounts the Pi must not hold: other sandboxes' namespace dirs (they
        # would pin those namespaces) and whatever sits below a path about to be private
        # (e.g. a host dockerd's overlay or netns mounts). Unmounting a copy here never
        # touches the host's original.
        drop = [p for p in points if f"/{NS_DIR}" in p]
        drop += [p for p in points for private, _ in PRIVATE_DIRS if at_or_below(p, private) and p != private]
        drop += [p for p in points for private, _ in PRIVATE_FILES if p == private]
        if drop:
            self._inside(["umount", "--lazy", *_deepest_first(drop)])
        self._replace_sys(points)
        for path, _ in (*PRIVATE_DIRS, *PRIVATE_FILES):
            self._inside(["mount", "--bind", "--make-private", str(self.host_path(path)), path])
        self._inside(["hostname", self.hostname])

    def _replace_sys(self, points: Sequence[str]) -> None:
        """A sysfs of the Pi's own network namespace, keeping the host's submounts of /sys
        (cgroups above all) by parking them and moving them back on top."""
        subs = [p for p in points if at_or_below(p, "/sys") and p != "/sys"]
        tops = [p for p in dict.fromkeys(subs) if not any(at_or_below(p, q) and p != q for q in subs)]
        parked = []
        shutil.rmtree(self.root / TMP_DIR, ignore_errors=True)
        for index, top in enumerate(tops):
            spot = self.root / TMP_DIR / str(index)
            spot.mkdir(parents=True)
            self._inside(["mount", "--rbind", top, str(spot)])
            parked.append((spot, top))
        self._inside(["umount", "--lazy", "/sys"])
        self._inside(["mount", "-t", "sysfs", "-o", "nosuid,nodev,noexec", "sysfs", "/sys"])
        for spot, top in parked:
            self._inside(["mount", "--move", str(spot), top])
        shutil.rmtree(self.root / TMP_DIR, ignore_errors=True)

    # ------------------------------------------------------------------ processes and mounts

    def pids(self) -> list[int]:
        """Live processes whose mount namespace is this sandbox's (dockerd, agent, bricks...)."""
        mine = _ns_id(self.mnt_ns) if self.exists() else None
        if mine is None:
            return []
        found = []
        for entry in os.scandir("/proc"):
            if entry.name.isdigit() and _ns_id(f"/proc/{entry.name}/ns/mnt") == mine:
                pid = int(entry.name)
                if netns._running(pid):
                    found.append(pid)
        return found

    def mounts(self) -> list[str]:
        """Mount points as seen inside the Pi."""
        return mount_points(self._mountinfo())

    def unmount_below(self, *prefixes: str) -> list[str]:
        """Lazily unmount everything mounted strictly below `prefixes` inside the Pi (what a
        daemon left: overlays, netns files, FUSE mounts); returns what was unmounted."""
        if not self.exists():
            return []
        points = [p for p in self.mounts() for prefix in prefixes if at_or_below(p, prefix) and p != prefix]
        if points:
            self.run(["umount", "--lazy", *_deepest_first(points)], timeout=MOUNT_TIMEOUT)
        return points

    # ------------------------------------------------------------------ destroy

    def destroy(self, timeout: float = DESTROY_TIMEOUT, remove_files: bool = False) -> None:
        """Kill whatever runs inside (SIGTERM, then SIGKILL), unmount the namespace files
        (the kernel then drops every mount made inside), and optionally delete root.
        Idempotent; raises LabError naming what is left if something would not go."""
        require_root()
        problems = []
        survivors: list[int] = []
        for _ in range(3):  # a dying daemon may still spawn (dockerd restarting containerd)
            pids = self.pids()
            if not pids:
                break
            survivors = kill_processes(with_descendants(pids), timeout)
        if survivors:
            problems.append(f"processes {survivors} survived SIGKILL")
        host_points = host_mount_points()
        for path in (self.mnt_ns, self.uts_ns, self.ns_dir):
            # More than once: a mount could have been stacked by a racing create().
            while str(path) in host_points:
                done = _host(["umount", str(path)], check=False)
                if done.returncode != 0:
                    problems.append(f"umount {path}: {done.stderr.strip()}")
                    break
                host_points = host_mount_points()
        left = [p for p in host_mount_points() if at_or_below(p, str(self.root))]
        if left:
            problems.append(f"still mounted on the host: {left}")
        if problems:
            raise LabError(
                f"sandbox {self.name} ({self.root}) was not destroyed cleanly: {'; '.join(problems)}"
            )
        if remove_files:
            shutil.rmtree(self.root, ignore_errors=True)
        else:
            shutil.rmtree(self.ns_dir, ignore_errors=True)

    def describe(self) -> dict[str, str]:
        return {"name": self.name, "netns": self.netns, "root": str(self.root), "hostname": self.hostname}

    @classmethod
    def from_dict(cls, data: Mapping[str, str]) -> PiSandbox:
        return cls(data["name"], data["netns"], Path(data["root"]), data.get("hostname"))


def _host(argv: Sequence[str], check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        list(argv),
        capture_output=True,
        text=True,
        timeout=MOUNT_TIMEOUT,
        check=False,
        stdin=subprocess.DEVNULL,
    )
    if check and done.returncode != 0:
        raise LabError(f"`{' '.join(argv)}` failed: {(done.stderr or done.stdout).strip()}")
    return done


def find_sandboxes(under: Path | str | None = None) -> list[PiSandbox]:
    """Sandboxes whose namespace is mounted on the host (optionally only below `under`),
    found from the host's mount table and their marker files: for sweeping after a crash.
    One whose marker is gone has netns "" (its lab cannot be told)."""
    found = []
    for point in host_mount_points():
        if not point.endswith(f"/{NS_DIR}") or (under is not None and not at_or_below(point, str(under))):
            continue
        root = Path(point).parent
        try:
            data = json.loads((root / MARKER).read_text())
            found.append(PiSandbox(data["name"], data["netns"], root))
        except (OSError, ValueError, KeyError, TypeError):
            # The marker was deleted (e.g. a tmp dir cleaner): still destroyable, lab unknown.
            found.append(PiSandbox(root.name, "", root))
    return found


# --------------------------------------------------------------------------- daemons


@dataclass
class DaemonHandle:
    """A daemon running inside a sandbox; stop() ends it and what it forked."""

    name: str
    sandbox: PiSandbox
    popen: subprocess.Popen[bytes]
    log_path: Path
    stop_timeout: float = STOP_TIMEOUT
    cleanup: list[str] = field(default_factory=list)  # paths whose submounts stop() removes
    public_socket: str | None = None  # the default client path bound to the daemon's socket

    @property
    def pid(self) -> int:
        return self.popen.pid

    def running(self) -> bool:
        return self.popen.poll() is None

    def stop(self, timeout: float | None = None) -> None:
        """SIGTERM (graceful: dockerd stops its containers and containerd), SIGKILL after
        `timeout`, then SIGKILL what it forked and unmount what it left mounted inside."""
        timeout = self.stop_timeout if timeout is None else timeout
        family = with_descendants([self.pid]) if self.running() else set()
        if self.running():
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(timeout=5)
        family |= with_descendants(family)
        family.discard(self.pid)
        kill_processes(family, 2.0)
        self._after_stop()

    def _after_stop(self) -> None:
        if self.sandbox.exists():
            self.sandbox.unmount_below(*self.cleanup)
            if self.public_socket and self.public_socket in self.sandbox.mounts():
                self.sandbox.run(["umount", "--lazy", self.public_socket], timeout=MOUNT_TIMEOUT)

    def log_tail(self, lines: int = 40) -> str:
        return tail(self.log_path, lines)


def _wait(handle: DaemonHandle, ready: Callable[[], bool | str], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    last = ""
    while True:
        if not handle.running():
            code = handle.popen.poll()
            handle.stop()
            raise LabError(
                f"{handle.name} in {handle.sandbox.name} exited (code {code}) before {what}; "
                f"log {handle.log_path}:\n{handle.log_tail()}"
            )
        try:
            answer = ready()
        except (OSError, subprocess.SubprocessError, LabError) as error:
            answer = str(error) or type(error).__name__
        if answer is True:
            return
        last = str(answer)
        if time.monotonic() >= deadline:
            handle.stop()
            raise LabError(
                f"{handle.name} in {handle.sandbox.name} did not come up within {timeout:g}s "
                f"({what}; last answer: {last}); log {handle.log_path}:\n{handle.log_tail()}"
            )
        time.sleep(0.1)


def dockerd_argv(extra_args: Sequence[str] = ()) -> list[str]:
    return [
        "dockerd",
        "--host",
        f"unix://{DOCKER_SOCKET}",
        "--pidfile",
        "/run/docker/docker.pid",
        "--exec-root",
        "/run/docker/exec",
        "--data-root",
        "/var/lib/docker",
        *extra_args,
    ]


def docker_ping(sb: PiSandbox) -> bool | str:
    """True once the Pi's dockerd answers /_ping (dialled from the host through root/fs)."""
    host_socket = sb.host_path(DOCKER_SOCKET)
    if len(str(host_socket).encode()) <= 107:
        if not host_socket.exists():
            return "socket not there yet"
        try:
            return DockerAPI(str(host_socket), timeout=2.0, negotiate=False).ping() or "/_ping did not say OK"
        except CALL_ERRORS as error:
            return explain(error)
    done = sb.run(["docker", "-H", f"unix://{DOCKER_SOCKET}", "version"], timeout=10)  # long paths
    return True if done.returncode == 0 else done.stderr.strip()[-300:]


def start_dockerd(
    sb: PiSandbox, log_path: Path, timeout: float = 60, extra_args: Sequence[str] = ()
) -> DaemonHandle:
    """dockerd (with its own containerd) inside the Pi, socket at sb.docker_socket inside
    (sb.host_path(sb.docker_socket) from the host), also bound over /var/run/docker.sock
    inside the Pi so clients' defaults reach it; returns once /_ping answers.

    iptables stays on: Swarm's ingress and overlay networks need it, and the rules land in
    the Pi's own network namespace, not the host's."""
    if not sb.exists():
        raise LabError(f"sandbox {sb.name} does not exist: call create() first")
    stale = sb.host_path("/run/docker/docker.pid")
    with contextlib.suppress(FileNotFoundError):
        stale.unlink()  # a pid file of a killed dockerd would stop the new one
    popen = sb.popen(dockerd_argv(extra_args), log_path)
    cleanup = ["/run/docker", "/var/lib/docker", "/run/containerd", "/var/lib/containerd"]
    handle = DaemonHandle(
        "dockerd", sb, popen, log_path, cleanup=cleanup, public_socket=DOCKER_DEFAULT_SOCKET
    )
    _wait(handle, lambda: docker_ping(sb), timeout, "its /_ping answered")
    _wait(handle, lambda: bind_default_socket(sb, DOCKER_DEFAULT_SOCKET), timeout, "its socket was bound")
    return handle


def glusterd_argv(log_path: Path) -> list[str]:
    return [
        "glusterd",
        "--no-daemon",
        f"--log-file={log_path}",
        f"--xlator-option=management.glusterd-sockfile={GLUSTERD_PRIVATE_SOCKET}",
    ]


def bind_default_socket(sb: PiSandbox, public: str) -> bool | str:
    """Make `public` (e.g. /run/glusterd.socket) inside the Pi lead to the Pi's own daemon
    socket, by bind-mounting the private socket over it; True once done.

    The mount point must exist on the host: an empty file is created there if the host has
    nothing. Caveat: if a host daemon later replaces the host's file, the kernel detaches
    this mount in every Pi, and the default path would lead to the host's daemon again;
    socket_bound() tells, and calling this again repairs it."""
    private = sb.default_sockets[public]
    if not sb.host_path(private).is_socket():
        return f"{private} does not exist yet"
    host_stub = Path(public)
    if not host_stub.exists() and not host_stub.is_symlink():
        with contextlib.suppress(FileExistsError):
            host_stub.touch(mode=0o600, exist_ok=False)  # nothing listens here: a mount point
    if public in sb.mounts():
        sb.run(["umount", "--lazy", public], timeout=MOUNT_TIMEOUT, check=True)
    sb.run(["mount", "--bind", private, public], timeout=MOUNT_TIMEOUT, check=True)
    return True if socket_bound(sb, public) else f"{public} is not {private} after the bind mount"


def socket_bound(sb: PiSandbox, public: str) -> bool:
    """Whether `public` inside the Pi is the Pi's own daemon socket (same inode)."""
    private = sb.default_sockets[public]
    try:
        mine = os.stat(sb.host_path(private))
    except FileNotFoundError:
        return False
    done = sb.run(["stat", "--dereference", "--format=%d:%i", public], timeout=MOUNT_TIMEOUT)
    return done.returncode == 0 and done.stdout.strip() == f"{mine.st_dev}:{mine.st_ino}"


def gluster_ready(sb: PiSandbox) -> bool | str:
    done = sb.run(["gluster", "--mode=script", "peer", "status"], timeout=10)
    return True if done.returncode == 0 else (done.stderr or done.stdout).strip()[-300:]


def start_glusterd(sb: PiSandbox, log_path: Path, timeout: float = 60) -> DaemonHandle:
    """glusterd in the foreground inside the Pi; returns once `gluster peer status` (on the
    CLI's default socket path, inside the Pi) answers. Bricks it starts keep running after
    stop(), as on a real host; destroy() ends them."""
    if not sb.exists():
        raise LabError(f"sandbox {sb.name} does not exist: call create() first")
    with contextlib.suppress(FileNotFoundError):
        sb.host_path(GLUSTERD_PRIVATE_SOCKET).unlink()
    popen = sb.popen(glusterd_argv(log_path), log_path)
    handle = DaemonHandle("glusterd", sb, popen, log_path, public_socket=GLUSTERD_SOCKET)
    _wait(handle, lambda: bind_default_socket(sb, GLUSTERD_SOCKET), timeout, "its socket appeared")
    _wait(handle, lambda: gluster_ready(sb), timeout, "`gluster peer status` answered")
    return handle


SERVICES = {"dockerd": start_dockerd, "glusterd": start_glusterd}


# --------------------------------------------------------------------------- a rack of them


class PiRack:
    """Sandboxes (and their services) for every Pi of an existing lab network, without a
    coordinator or agents: what executor tests need. Services start in parallel across Pis.

    down() stops services and destroys sandboxes (not the network, whose owner removes it);
    it works on a half-made rack and on one rebuilt with from_dict() in another process."""

    def __init__(
        self,
        network: LabNetwork,
        root: Path | str,
        services: Sequence[str] = (),
        logs_dir: Path | str | None = None,
        service_timeout: float = 60.0,
        stop_timeout: float = DESTROY_TIMEOUT,
        service_args: Mapping[str, Sequence[str]] | None = None,
        node_service_args: Mapping[str, Mapping[str, Sequence[str]]] | None = None,
    ) -> None:
        unknown = [name for name in services if name not in SERVICES]
        if unknown:
            raise LabError(f"unknown lab service(s) {unknown}: known are {sorted(SERVICES)}")
        self.network = network
        self.root = Path(root).absolute()
        self.services = tuple(services)
        self.service_args = {name: tuple(args) for name, args in (service_args or {}).items()}
        # node -> service -> args, in place of service_args on that node (e.g. an arm64 Pi's
        # dockerd pulls Docker Hub names through another mirror)
        self.node_service_args = {
            node: {name: tuple(args) for name, args in by_service.items()}
            for node, by_service in (node_service_args or {}).items()
        }
        self.logs_dir = Path(logs_dir) if logs_dir else self.root / "logs"
        self.service_timeout = service_timeout
        self.stop_timeout = stop_timeout
        self.sandboxes: dict[str, PiSandbox] = {
            pi.node: PiSandbox(pi.node, pi.netns, self.root / pi.node) for pi in network.pis
        }
        self.daemons: dict[str, dict[str, DaemonHandle]] = {node: {} for node in self.sandboxes}

    @property
    def nodes(self) -> list[str]:
        return list(self.sandboxes)

    def sandbox(self, node: str) -> PiSandbox:
        try:
            return self.sandboxes[node]
        except KeyError:
            raise LabError(f"no sandbox for {node!r} (there are {self.nodes})") from None

    def address(self, node: str) -> str:
        return self.network.pi(node).address

    def daemon(self, node: str, service: str) -> DaemonHandle:
        try:
            return self.daemons[node][service]
        except KeyError:
            raise LabError(f"{service} was not started on {node}") from None

    def log_path(self, node: str, service: str) -> Path:
        return self.logs_dir / f"{node}-{service}.log"

    def up(self) -> PiRack:
        """Create every sandbox, then start the services on all Pis at once; on failure
        everything made so far is taken down before the error propagates."""
        try:
            for sandbox in self.sandboxes.values():
                sandbox.create()
            for service in self.services:
                self.start_service(service)
        except BaseException as error:
            try:
                self.down()
            except LabError as cleanup_error:
                error.add_note(f"and cleaning up after it failed too: {cleanup_error}")
            raise
        return self

    def start_service(self, service: str, nodes: Sequence[str] | None = None) -> None:
        """Start `service` on `nodes` (default all) in parallel; raises the first failure."""
        chosen = list(nodes) if nodes is not None else self.nodes
        with ThreadPoolExecutor(max_workers=max(1, len(chosen))) as pool:
            futures = {
                node: pool.submit(
                    self._starter(service, node),
                    self.sandbox(node),
                    self.log_path(node, service),
                    self.service_timeout,
                )
                for node in chosen
            }
        errors = []
        for node, future in futures.items():
            try:
                self.daemons[node][service] = future.result()
            except Exception as error:
                errors.append(f"{node}: {error}")
        if errors:
            raise LabError(f"{service} did not start: " + "\n".join(errors))

    def _starter(self, service: str, node: str) -> Callable[..., DaemonHandle]:
        args = self.node_service_args.get(node, {}).get(service, self.service_args.get(service))
        if args:  # e.g. dockerd's --insecure-registry for the lab registry
            return functools.partial(SERVICES[service], extra_args=args)
        return SERVICES[service]

    def down(self) -> None:
        """Destroy every sandbox at once: SIGTERM to everything inside (dockerd, glusterd,
        bricks, containers...), SIGKILL after stop_timeout. No graceful service stop: the
        Pis' state goes with the lab, and a container ignoring SIGTERM would cost 10s."""
        problems = []
        with ThreadPoolExecutor(max_workers=max(1, len(self.sandboxes))) as pool:
            futures = [pool.submit(sandbox.destroy, self.stop_timeout) for sandbox in self.sandboxes.values()]
        for future in futures:
            try:
                future.result()
            except LabError as error:
                problems.append(str(error))
        for handles in self.daemons.values():
            for handle in handles.values():
                with contextlib.suppress(subprocess.TimeoutExpired):
                    handle.popen.wait(timeout=1)  # reap: destroy() killed it
            handles.clear()
        if problems:
            raise LabError("; ".join(problems))

    def describe(self) -> dict[str, Any]:
        return {
            "root": str(self.root),
            "services": list(self.services),
            "logs_dir": str(self.logs_dir),
            "sandboxes": {node: sb.describe() for node, sb in self.sandboxes.items()},
        }

    @classmethod
    def from_dict(cls, network: LabNetwork, data: Mapping[str, Any]) -> PiRack:
        rack = cls(network, data["root"], data.get("services", ()), data.get("logs_dir"))
        rack.sandboxes = {node: PiSandbox.from_dict(sb) for node, sb in data.get("sandboxes", {}).items()}
        rack.daemons = {node: {} for node in rack.sandboxes}
        return rack
