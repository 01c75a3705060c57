"""arm64 Pis on an amd64 machine: a Debian bookworm arm64 root run through qemu-user.

Why: the seed places `mcp-server` on `node.platform.arch == aarch64`, so a lab of amd64 Pis
can only plan it. Here an arm64 Pi is a lab Pi whose agent is Debian's arm64 python3 with
the `picoord-agent` deb installed by apt (dependencies from Debian's arm64 packages), run
chrooted inside the Pi's namespaces: the kernel hands every aarch64 ELF to
qemu-aarch64-static through binfmt_misc, so `platform.machine()` says `aarch64`.

* binfmt: qemu-user-static's /usr/lib/binfmt.d/qemu-aarch64.conf, registered here if no init
  did it. Its F flag opens the interpreter at registration, so it works inside chroots,
  mount namespaces and containers that have no qemu of their own.
* roots (cached under CACHE_DIR, keyed by their recipe, built once under a lock):
  the base from `debootstrap --arch=arm64 --variant=minbase` with the agent's dependencies
  (about 3 minutes on 2 cores); then an "agent layer" per agent deb (keyed by its digest):
  an overlay upper dir holding what `apt-get install ./picoord-agent_*.deb` changed.
  Each Pi mounts its own overlay (lower: layer + base) inside its mount namespace, so the
  cached roots are never written and the mount goes when the Pi does.
* busybox: Debian's busybox-static:arm64 (`apt-get download`, `dpkg-deb -x`), for the
  lab's stand-in images in arm64.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

from picoord.lab.images import host_architecture
from picoord.lab.netns import LabError

CACHE_DIR = Path("/var/cache/picoord-test")  # shared with the package install test's amd64 root
SUITE = "bookworm"
ARCH = "arm64"  # Debian's and Docker's word
MACHINE = "aarch64"  # the kernel's (uname -m), what the agent reports
BINFMT_DIR = Path("/proc/sys/fs/binfmt_misc")
BINFMT_CONF = Path("/usr/lib/binfmt.d/qemu-aarch64.conf")  # from qemu-user-static
# What the agent deb depends on (packaging/deb/debian/control), so installing the deb needs
# no download: apt only unpacks it and runs its maintainer scripts.
# python3-cffi-backend: python3-cryptography needs it through a virtual package, which
# debootstrap does not resolve.
AGENT_DEPENDENCIES = (
    "python3",
    "python3-cffi-backend",
    "python3-cryptography",
    "python3-docker",
    "python3-grpcio",
    "python3-protobuf",
    "python3-psutil",
    "python3-structlog",
    "python3-tenacity",
)
# An arm64 Pi's agent is python3 under qemu-user: it starts grpc in seconds, not
# milliseconds, so labs with arm64 Pis wait longer for it to start and enroll.
START_TIMEOUT = 180.0
READY_TIMEOUT = 240.0
DEBOOTSTRAP_TIMEOUT = 1800.0
INSTALL_TIMEOUT = 900.0
SYSTEM_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
# Paths of the Pi a chrooted agent needs, bind-mounted at the same path inside its root:
# with what is mounted below them (cgroups, /dev/pts), or alone (the docker dir: not the
# netns files dockerd mounts below it).
PI_RBINDS = ("/proc", "/sys", "/dev")
PI_BINDS = (*PI_RBINDS, "/run/docker")


def _run(argv: Sequence[str], timeout: float, what: str) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        list(argv), capture_output=True, text=True, timeout=timeout, check=False, stdin=subprocess.DEVNULL
    )
    if done.returncode != 0:
        output = (done.stderr or done.stdout)[-2000:]
        raise LabError(f"{what}: `{' '.join(argv)}` exited {done.returncode}: {output}")
    return done


# --------------------------------------------------------------------------- binfmt


def binfmt_line(conf_text: str) -> str:
    """The registration line of a binfmt.d file (its one non-comment line)."""
    lines = [line.strip() for line in conf_text.splitlines() if line.strip() and not line.startswith("#")]
    if len(lines) != 1 or not lines[0].startswith(":"):
        raise LabError(f"{BINFMT_CONF} does not hold one binfmt_misc line: {conf_text[:200]!r}")
    return lines[0]


def binfmt_flags(entry_text: str) -> str:
    """The flags of a registered entry (/proc/sys/fs/binfmt_misc/NAME), e.g. "POF"."""
    for line in entry_text.splitlines():
        if line.startswith("flags:"):
            return line.split(":", 1)[1].strip()
    return ""


def ensure_binfmt() -> str:
    """Make aarch64 ELF files run through qemu-user, with the F flag; returns the entry's
    flags. Mounts binfmt_misc if needed and registers qemu-user-static's line if missing."""
    if not BINFMT_CONF.is_file():
        raise LabError(f"{BINFMT_CONF} is missing: apt-get install qemu-user-static binfmt-support")
    if not (BINFMT_DIR / "register").exists():
        _run(["mount", "-t", "binfmt_misc", "binfmt_misc", str(BINFMT_DIR)], 30, "mounting binfmt_misc")
    entry = BINFMT_DIR / "qemu-aarch64"
    if not entry.exists():
        with contextlib.suppress(FileExistsError):  # another lab registered it meanwhile
            (BINFMT_DIR / "register").write_text(binfmt_line(BINFMT_CONF.read_text()))
    text = entry.read_text()
    if not text.startswith("enabled"):
        raise LabError(f"{entry} is disabled: echo 1 > {entry}")
    flags = binfmt_flags(text)
    if "F" not in flags:
        raise LabError(
            f"{entry} is registered without the F flag ({flags!r}): aarch64 programs would not run "
            f"inside chroots; echo -1 > {entry} and register {BINFMT_CONF} again"
        )
    return flags


# --------------------------------------------------------------------------- cached roots


def recipe_key(recipe: dict[str, object]) -> str:
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]


@contextlib.contextmanager
def _cache_lock(cache_dir: Path) -> Iterator[None]:
    cache_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    with open(cache_dir / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _base_recipe(mirror: str) -> dict[str, object]:
    return {
        "suite": SUITE,
        "arch": ARCH,
        "variant": "minbase",
        "mirror": mirror,
        "include": AGENT_DEPENDENCIES,
    }


def base_root_path(mirror: str, cache_dir: Path = CACHE_DIR) -> Path:
    """Where base_root() keeps the root of this recipe (built or not)."""
    return cache_dir / f"{SUITE}-{ARCH}-{recipe_key(_base_recipe(mirror))}"


def agent_layer_path(base: Path, agent_deb: Path, cache_dir: Path = CACHE_DIR) -> Path:
    """Where agent_layer() keeps the layer of this deb over `base` (built or not)."""
    digest = hashlib.sha256(agent_deb.read_bytes()).hexdigest()[:12]
    return cache_dir / f"{base.name}-agent-{digest}"


def agent_root_cached(mirror: str, agent_deb: Path, cache_dir: Path = CACHE_DIR) -> bool:
    """Whether agent_root() would find both layers built (so it returns in a moment)."""
    base = base_root_path(mirror, cache_dir)
    layer = agent_layer_path(base, agent_deb, cache_dir)
    return (base / "etc" / "debian_version").is_file() and (
        layer / "upper" / "usr" / "bin" / "picoord-agent"
    ).is_file()


def base_root(mirror: str, cache_dir: Path = CACHE_DIR) -> Path:
    """A bookworm arm64 minbase root with the agent's dependencies, from debootstrap:
    built once, then reused read-only for as long as its recipe is unchanged."""
    if not shutil.which("debootstrap"):
        raise LabError("debootstrap is missing: apt-get install debootstrap")
    ensure_binfmt()
    recipe = _base_recipe(mirror)
    root = base_root_path(mirror, cache_dir)
    with _cache_lock(cache_dir):
        if not (root / "etc" / "debian_version").is_file():
            partial = root.with_name(root.name + ".partial")
            shutil.rmtree(partial, ignore_errors=True)
            argv = ["debootstrap", f"--arch={ARCH}", "--variant=minbase"]
            argv += [f"--include={','.join(AGENT_DEPENDENCIES)}", SUITE, str(partial), mirror]
            _run(argv, DEBOOTSTRAP_TIMEOUT, "building the arm64 root")
            (partial / "recipe.json").write_text(json.dumps(recipe))
            partial.rename(root)
    return root


def _mount_overlay(lower: Sequence[Path], upper: Path, work: Path, merged: Path) -> None:
    options = f"lowerdir={':'.join(map(str, lower))},upperdir={upper},workdir={work}"
    _run(["mount", "-t", "overlay", "overlay", "-o", options, str(merged)], 60, "mounting an overlay")


def agent_layer(base: Path, agent_deb: Path, cache_dir: Path = CACHE_DIR) -> Path:
    """An overlay upper dir over `base` holding what `apt-get install ./AGENT.deb` changed
    (run under qemu-user, chrooted): cached per deb digest. Dependencies are in the base
    already, so apt resolves them from what is installed and downloads nothing."""
    layer = agent_layer_path(base, agent_deb, cache_dir)
    with _cache_lock(cache_dir):
        if (layer / "upper" / "usr" / "bin" / "picoord-agent").is_file():
            return layer / "upper"
        shutil.rmtree(layer, ignore_errors=True)
        for name in ("upper", "work", "merged"):
            (layer / name).mkdir(parents=True)
        merged = layer / "merged"
        _mount_overlay([base], layer / "upper", layer / "work", merged)
        try:
            shutil.copy(agent_deb, merged / "tmp" / agent_deb.name)
            for path in ("proc", "dev"):
                _run(["mount", "--bind", f"/{path}", str(merged / path)], 30, f"mounting /{path}")
            try:
                argv = ["chroot", str(merged), "/usr/bin/env", "-i", f"PATH={SYSTEM_PATH}"]
                argv += ["DEBIAN_FRONTEND=noninteractive", "apt-get", "install", "-y", "-q"]
                _run([*argv, f"/tmp/{agent_deb.name}"], INSTALL_TIMEOUT, "installing the agent deb (arm64)")
                _run(["chroot", str(merged), "/usr/bin/picoord-agent", "--help"], 300, "the arm64 agent")
            finally:
                for path in ("proc", "dev"):
                    _run(["umount", str(merged / path)], 30, f"unmounting /{path}")
            (merged / "tmp" / agent_deb.name).unlink()
        finally:
            _run(["umount", str(merged)], 60, "unmounting the agent layer")
        shutil.rmtree(layer / "work", ignore_errors=True)
    return layer / "upper"


def agent_root(mirror: str, agent_deb: Path, cache_dir: Path = CACHE_DIR) -> list[Path]:
    """The arm64 Pis' root as overlay lower dirs, top first: the agent layer over the base
    (what `Lab(arm64_root=...)` takes). Builds whichever is not cached yet."""
    base = base_root(mirror, cache_dir)
    return [agent_layer(base, agent_deb, cache_dir), base]


def apt_download(packages: Sequence[str], into: Path, arch: str) -> None:
    """`apt-get download` of Debian packages (NAME or NAME:ARCH) into `into`, with the host's
    apt: another architecture's needs it in dpkg's list, which the error says how to add."""
    done = subprocess.run(
        ["apt-get", "download", *packages], cwd=into, capture_output=True, text=True, timeout=300, check=False
    )
    if done.returncode != 0:
        foreign = arch != host_architecture()  # Docker's words, which are Debian's for amd64/arm64
        hint = f"dpkg --add-architecture {arch} && apt-get update" if foreign else "apt-get update"
        raise LabError(f"apt-get download {' '.join(packages)} failed ({done.stderr.strip()[-500:]}): {hint}")


def busybox(cache_dir: Path = CACHE_DIR) -> bytes:
    """Debian's static busybox for arm64 (busybox-static:arm64), cached as a plain file.
    Needs arm64 in dpkg's architectures (`dpkg --add-architecture arm64; apt-get update`)."""
    target = cache_dir / f"busybox-{ARCH}"
    with _cache_lock(cache_dir):
        if not target.is_file():
            download = cache_dir / "busybox-download"
            shutil.rmtree(download, ignore_errors=True)
            download.mkdir()
            try:
                apt_download([f"busybox-static:{ARCH}"], download, ARCH)
                (deb,) = download.glob("busybox-static_*.deb")
                _run(["dpkg-deb", "-x", str(deb), str(download / "tree")], 120, "unpacking busybox-static")
                shutil.copyfile(download / "tree" / "bin" / "busybox", target.with_suffix(".partial"))
                target.with_suffix(".partial").rename(target)
            finally:
                shutil.rmtree(download, ignore_errors=True)
    data = target.read_bytes()
    if data[:4] != b"\x7fELF" or data[18:20] != b"\xb7\x00":  # e_machine 183: EM_AARCH64
        raise LabError(f"{target} is not an aarch64 ELF binary: delete it to fetch it again")
    return data


# --------------------------------------------------------------------------- the agent deb

REPO_ROOT = Path(__file__).resolve().parents[1]
BUILD_DEBS = REPO_ROOT / "packaging" / "deb" / "build-debs"
AGENT_PACKAGE = "picoord-agent"
DEB_PACKAGES = (AGENT_PACKAGE, "picoord-coordinator")
BUILD_DEBS_TIMEOUT = 1800.0


def build_debs(out: Path, version: str | None = None) -> dict[str, Path]:
    """`make deb`'s builder (packaging/deb/build-debs) into `out`: package name -> .deb.
    The build is reproducible, so the agent layer cached for a deb of the same tree is hit."""
    if not BUILD_DEBS.is_file():
        raise LabError(f"{BUILD_DEBS} is missing: run from a picoord checkout, or pass --agent-deb FILE")
    argv = [sys.executable, str(BUILD_DEBS), "--out", str(out)]
    if version:
        argv += ["--version", version]
    _run(argv, BUILD_DEBS_TIMEOUT, "building the Debian packages (make deb)")
    built = {}
    for package in DEB_PACKAGES:
        found = sorted(out.glob(f"{package}_{version or '*'}_all.deb"))
        if len(found) != 1:
            raise LabError(f"build-debs left {[path.name for path in found]} for {package} in {out}")
        built[package] = found[0]
    return built


# --------------------------------------------------------------------------- a Pi's root


def pi_root_dirs(pi_dir: Path) -> dict[str, Path]:
    """Where one Pi's overlay lives (under its sandbox root)."""
    base = pi_dir / "arm64"
    return {name: base / name for name in ("upper", "work", "merged")}


def pi_root_commands(lower: Sequence[Path], pi_dir: Path, shared: Sequence[str]) -> list[list[str]]:
    """The mounts, run inside the Pi's mount namespace, that make its arm64 root: an overlay
    (upper per Pi, so a Pi's changes survive its agent's restart), then /proc, /sys, /dev,
    the Pi's docker dir and the `shared` host dirs (the lab's work dir) at the same paths."""
    dirs = pi_root_dirs(pi_dir)
    merged = dirs["merged"]
    options = f"lowerdir={':'.join(map(str, lower))},upperdir={dirs['upper']},workdir={dirs['work']}"
    commands = [["mount", "-t", "overlay", "overlay", "-o", options, str(merged)]]
    for path in (*PI_BINDS, *shared):
        target = f"{merged}{path}"
        commands.append(["mkdir", "-p", target])
        commands.append(["mount", "--rbind" if path in PI_RBINDS else "--bind", path, target])
    return commands


def chroot_argv(pi_dir: Path, argv: Sequence[str]) -> list[str]:
    """argv run chrooted in the Pi's arm64 root, with the root's PATH. The rest of the
    environment passes (a join token travels in it); the deb's commands run python3 -I."""
    merged = pi_root_dirs(pi_dir)["merged"]
    return ["chroot", str(merged), "/usr/bin/env", f"PATH={SYSTEM_PATH}", "LANG=C.UTF-8", *argv]


def prepare_pi_dirs(pi_dir: Path) -> None:
    for path in pi_root_dirs(pi_dir).values():
        path.mkdir(parents=True, exist_ok=True)
    os.chmod(pi_dir / "arm64", 0o700)


# --------------------------------------------------------------------------- netfilter tools

# qemu-user refuses NETLINK_NETFILTER sockets, so an arm64 nft or iptables cannot work in an
# emulated Pi. The kernel runs this machine's own x86_64 programs natively, though: a layer
# on top of the Pi's root holds the host's nft and iptables (xtables-nft-multi) with their
# libraries, loader and iptables extensions, so the agent's published-ports table
# (agent/networking/service_ports.py) loads there as on a real Pi. keepalived goes there too,
# for the same reason: its VRRP instances track interfaces and addresses through netlink
# (agent/networking/virtual_addresses.py).
HOST_NETFILTER_TOOLS = {
    "nft": "/usr/sbin/nft",
    "xtables-nft-multi": "/usr/sbin/xtables-nft-multi",
    "keepalived": "/usr/sbin/keepalived",
}
TOOL_LINKS = {"iptables": "xtables-nft-multi"}


def ldd_paths(text: str) -> list[str]:
    """The absolute paths `ldd` names (the libraries and the loader), in order, once each."""
    found: list[str] = []
    for line in text.splitlines():
        for word in line.split():
            if word.startswith("/") and word not in found:
                found.append(word)
    return found


def layer_path(host_path: str) -> str:
    """Where a host file goes in the layer: under its directory's real path (this machine's
    /lib and /lib64 are links into /usr, and so are the arm64 root's /lib, /bin and /sbin: a
    real lib/ directory in a layer would hide the arm64 root's link), by the name it is
    asked for (a library's soname, not the file its link leads to)."""
    directory, name = os.path.split(host_path)
    return os.path.join(os.path.realpath(directory), name).lstrip("/")


def host_netfilter_layer(into: Path) -> Path:
    """Build the layer (idempotent); returns `into`."""
    if all((into / "usr" / "sbin" / name).exists() for name in HOST_NETFILTER_TOOLS):
        return into
    files: list[str] = []
    for name, path in HOST_NETFILTER_TOOLS.items():
        target = into / "usr" / "sbin" / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(os.path.realpath(path), target)
        files += ldd_paths(_run(["ldd", path], 30, f"ldd {path}").stdout)
    for link, name in TOOL_LINKS.items():
        if not (into / "usr" / "sbin" / link).is_symlink():
            (into / "usr" / "sbin" / link).symlink_to(name)
    extensions = sorted(Path("/usr/lib").glob("*-linux-gnu/xtables"))
    for directory in extensions[:1]:
        shutil.copytree(directory, into / layer_path(str(directory)), dirs_exist_ok=True)
    for path in files:
        target = into / layer_path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(os.path.realpath(path), target)
    # the ELF interpreter, at /lib64/ld-linux-x86-64.so.2 (the loader itself is in usr/lib64, as here)
    if any(path.startswith("/lib64/") for path in files) and not (into / "lib64").is_symlink():
        (into / "lib64").symlink_to("usr/lib64")
    return into
