"""The Debian packages `make deb` builds: what they hold, and how they behave installed.

Quick (about a minute, no root): both packages are built once with packaging/deb/build-debs
and their contents, dependencies, conffiles, entry points and lintian's verdict checked;
the example configs are checked against the settings the daemons accept.

For real (root, a few minutes): a Debian 12 root from debootstrap (cached in CACHE_DIR,
keyed by what goes into it) gets the packages with apt, dependencies from Debian's mirror;
systemd boots in it under systemd-nspawn with a private network (loopback only), and the
test checks that the coordinator starts, the agent enrolls and is listed by coordctl, and
that both come back after `systemctl restart`, a reboot and an upgrade to another version,
enrollment intact; that the agent, under its hardened unit, mounts (tmpfs, bind), sets an
nftables policy, and has the container's own dockerd pull an image and run a replica with
a bind volume and a published port; then remove keeps the state and purge deletes it.

Docker in the container needs two things of systemd-nspawn, not of the agent's unit:
runc's keyring calls allowed (`--system-call-filter`), and on a cgroup v1 host the cgroup
controllers writable in the container's view (Container.writable_cgroup_controllers).
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import fcntl
import hashlib
import importlib.machinery
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest

from picoord.agent.cli import AGENT_SETTINGS, load_config
from picoord.coordinator.config import CoordinatorConfig
from picoord.lab.arm64 import BUILD_DEBS, DEB_PACKAGES, build_debs
from picoord.lab.images import BUSYBOX, build_image, docker_archive, host_architecture, stand_ins
from picoord.lab.registry import registry_config
from tests.conftest import require_root_or_fail

REPO_ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = REPO_ROOT / "packaging" / "deb" / "etc"
UNITS_DIR = REPO_ROOT / "systemd"
VERSION = "0.1.0"
UPGRADE_VERSION = "0.1.0+test1"
AGENT, COORDINATOR = DEB_PACKAGES
PACKAGES = DEB_PACKAGES

# Each package: its private tree, the picoord modules it holds and those it must not.
TREES = {AGENT: "usr/share/picoord/agent", COORDINATOR: "usr/share/picoord/coordinator"}
SHIPPED = {AGENT: {"agent", "common", "v1"}, COORDINATOR: {"coordinator", "common", "v1"}}
COMMANDS = {AGENT: {"picoord-agent"}, COORDINATOR: {"picoord-coordinator", "coordctl"}}
ENTRY_MODULES = {
    "picoord-agent": "picoord.agent.entry",
    "picoord-coordinator": "picoord.coordinator.main",
    "coordctl": "picoord.coordinator.ctl.cli",
}
# Third-party import name -> the Debian 12 package that provides it.
DEBIAN_MODULES = {
    "cryptography": "python3-cryptography",
    "docker": "python3-docker",
    "google": "python3-protobuf",
    "grpc": "python3-grpcio",
    "prometheus_client": "python3-prometheus-client",
    "psutil": "python3-psutil",
    "rich": "python3-rich",
    "structlog": "python3-structlog",
    "tenacity": "python3-tenacity",
    "yaml": "python3-yaml",
}

# The install test's Debian root.
CACHE_DIR = Path("/var/cache/picoord-test")
SUITE = "bookworm"
BASE_PACKAGES = ("systemd", "systemd-sysv", "dbus")
SYSTEM_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"


def run(argv: list[str], timeout: float, **kwargs: object) -> subprocess.CompletedProcess[str]:
    """Run argv, capture its output; a failure raises with the output in the message."""
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False, **kwargs)
    if done.returncode:
        raise AssertionError(f"{argv} exited {done.returncode}:\n{done.stdout}\n{done.stderr}")
    return done


def deb_field(deb: Path, name: str) -> str:
    return run(["dpkg-deb", "--field", str(deb), name], 60).stdout.strip()


def depends(deb: Path) -> set[str]:
    """The package names in Depends (versions and alternatives' details dropped)."""
    return {item.split()[0] for item in deb_field(deb, "Depends").split(",") if item.strip()}


def third_party_imports(tree: Path) -> set[str]:
    """Top-level modules imported anywhere below `tree` that are neither stdlib nor picoord."""
    found = set()
    for path in tree.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            found.update(name.split(".")[0] for name in names)
    return found - set(sys.stdlib_module_names) - {"picoord", "__future__"}


def commented_settings(text: str) -> dict[str, object]:
    """The settings an example config documents: its `#key = value` lines, parsed."""
    lines = [line[1:] for line in text.splitlines() if re.match(r"^#[a-z_]+ = ", line)]
    return tomllib.loads("\n".join(lines))


def mirror_from_sources(texts: list[str]) -> str | None:
    """The Debian archive (not -security) named in apt sources, one-line or deb822 style."""
    for text in texts:
        for line in text.splitlines():
            line = line.strip()
            if line.startswith("deb "):
                uris = [word for word in line.split()[1:] if not word.startswith("[")][:1]
            elif line.lower().startswith("uris:"):
                uris = line.split(":", 1)[1].split()
            else:
                continue
            for uri in uris:
                if re.match(r"^https?://[^ ]+/debian/?$", uri):
                    return uri.rstrip("/")
    return None


@pytest.mark.parametrize(
    ("texts", "expected"),
    [
        (["deb http://deb.debian.org/debian bookworm main"], "http://deb.debian.org/debian"),
        (["deb [arch=amd64] http://mirror.example/debian/ bookworm main"], "http://mirror.example/debian"),
        (["Types: deb\nURIs: http://deb.debian.org/debian-security\n"], None),
        (
            ["Types: deb\nURIs: http://deb.debian.org/debian-security\n", "URIs: https://m.example/debian\n"],
            "https://m.example/debian",
        ),
        (["deb https://packages.cloud.google.com/apt cloud-sdk-bookworm main"], None),
        (["# deb http://deb.debian.org/debian bookworm main"], None),
    ],
)
def test_mirror_from_sources(texts: list[str], expected: str | None) -> None:
    assert mirror_from_sources(texts) == expected


def load_build_debs():
    """packaging/deb/build-debs as a module, for its pure functions."""
    loader = importlib.machinery.SourceFileLoader("build_debs", str(BUILD_DEBS))
    module = importlib.util.module_from_spec(importlib.util.spec_from_loader(loader.name, loader))
    loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    ("version", "accepted"),
    [
        ("0.1.0", True),
        ("0.1.0+test1", True),
        ("0.2.0~rc1-1", True),
        ("", False),
        ("v0.1.0", False),
        ("0.1.0 evil", False),
        ("1:0.1.0", False),  # no epochs
        ("0.1.0/../x", False),
    ],
)
def test_build_debs_accepts_only_debian_versions(version: str, accepted: bool) -> None:
    builder = load_build_debs()
    previous = (REPO_ROOT / "packaging/deb/debian/changelog").read_text()
    if not accepted:
        with pytest.raises(builder.BuildError, match="not a Debian version"):
            builder.changelog_entry(version, previous, "Fri, 27 Nov 2026 09:00:00 +0000")
        return
    changelog = builder.changelog_entry(version, previous, "Fri, 27 Nov 2026 09:00:00 +0000")
    assert builder.changelog_version(changelog) == version
    assert changelog.endswith(previous)


def test_the_changelog_version_is_picoords_version() -> None:
    builder = load_build_debs()
    assert builder.changelog_version((REPO_ROOT / "packaging/deb/debian/changelog").read_text()) == VERSION
    assert tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["version"] == VERSION


# ---------------------------------------------------------------------------------------
# The example configs (no build needed).


def test_agent_example_config_documents_every_setting_with_its_default(tmp_path: Path) -> None:
    text = (EXAMPLES / "agent.toml").read_text()
    documented = commented_settings(text)
    assert set(documented) == set(AGENT_SETTINGS)
    assert documented["state_dir"] == "/var/lib/picoord/agent"
    # As shipped (all commented out) it changes nothing; uncommented, every value is valid.
    assert load_config(EXAMPLES / "agent.toml", required=True) == {}
    uncommented = tmp_path / "agent.toml"
    uncommented.write_text(re.sub(r"(?m)^#([a-z_]+ = )", r"\1", text))
    assert set(load_config(uncommented, required=True)) == set(AGENT_SETTINGS)


def test_coordinator_example_config_documents_every_setting_with_its_default(tmp_path: Path) -> None:
    text = (EXAMPLES / "coordinator.toml").read_text()
    documented = commented_settings(text)
    defaults = dataclasses.asdict(CoordinatorConfig())
    assert set(documented) == set(defaults)
    # log_json's default is "unset" (JSON unless on a terminal); every other value shown is the default.
    assert {key: value for key, value in documented.items() if key != "log_json"} == {
        key: value for key, value in defaults.items() if key != "log_json"
    }
    assert CoordinatorConfig.load(EXAMPLES / "coordinator.toml", required=True) == CoordinatorConfig()
    uncommented = tmp_path / "coordinator.toml"
    uncommented.write_text(re.sub(r"(?m)^#([a-z_]+ = )", r"\1", text))
    CoordinatorConfig.load(uncommented, required=True).validate()


# ---------------------------------------------------------------------------------------
# The packages' contents.


@pytest.fixture(scope="module")
def debs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return build_debs(tmp_path_factory.mktemp("debs"))


@pytest.fixture(scope="module")
def extracted(debs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    trees = {}
    for package, deb in debs.items():
        target = tmp_path_factory.mktemp(package)
        run(["dpkg-deb", "--extract", str(deb), str(target)], 60)
        trees[package] = target
    return trees


@pytest.mark.parametrize("package", PACKAGES)
def test_package_holds_its_private_tree_commands_unit_and_config(
    package: str, debs: dict[str, Path], extracted: dict[str, Path]
) -> None:
    root = extracted[package]
    files = {str(path.relative_to(root)) for path in root.rglob("*") if not path.is_dir()}
    assert deb_field(debs[package], "Architecture") == "all"
    assert not [name for name in files if "dist-packages" in name or "site-packages" in name]
    assert {path.name for path in (root / TREES[package] / "picoord").iterdir()} == SHIPPED[package]
    assert {path.name for path in (root / "usr/bin").iterdir()} == COMMANDS[package]
    unit = f"lib/systemd/system/{package}.service"
    assert (root / unit).read_text() == (UNITS_DIR / f"{package}.service").read_text()
    config = "agent.toml" if package == AGENT else "coordinator.toml"
    assert (root / "etc/picoord" / config).read_text() == (EXAMPLES / config).read_text()
    conffiles = run(["dpkg-deb", "--info", str(debs[package]), "conffiles"], 60).stdout.split()
    assert conffiles == [f"/etc/picoord/{config}"]
    generated = list((root / TREES[package] / "picoord/v1").glob("*_pb2*.py"))
    assert generated and not [path for path in generated if "runtime_version" in path.read_text()], (
        "picoord.v1 must be generated by Debian's protoc (no runtime_version import)"
    )


@pytest.mark.parametrize("package", PACKAGES)
def test_every_third_party_import_is_a_debian_dependency(
    package: str, debs: dict[str, Path], extracted: dict[str, Path]
) -> None:
    imported = third_party_imports(extracted[package] / TREES[package])
    unknown = imported - DEBIAN_MODULES.keys()
    assert not unknown, f"imports with no known Debian package: {unknown}"
    python_depends = {name for name in depends(debs[package]) if name.startswith("python3-")}
    assert python_depends == {DEBIAN_MODULES[module] for module in imported}


@pytest.mark.parametrize("command", sorted(ENTRY_MODULES))
def test_commands_run_from_the_package_tree_on_debians_python(
    command: str, extracted: dict[str, Path], tmp_path: Path
) -> None:
    """Each /usr/bin wrapper, pointed at the extracted tree, runs on /usr/bin/python3 and
    Debian's libraries (what a Pi has), generated code included."""
    package = AGENT if command == "picoord-agent" else COORDINATOR
    root = extracted[package]
    wrapper = (root / "usr/bin" / command).read_text()
    assert wrapper.startswith("#!/usr/bin/python3 -I\n")
    assert f'sys.path.insert(0, "/{TREES[package]}")' in wrapper
    assert f"from {ENTRY_MODULES[command]} import main" in wrapper
    relocated = tmp_path / command
    relocated.write_text(wrapper.replace(f'"/{TREES[package]}"', f'"{root / TREES[package]}"'))
    done = run(["/usr/bin/python3", "-I", str(relocated), "--help"], 120, env={"PATH": SYSTEM_PATH})
    assert "usage:" in done.stdout
    modules = [f"picoord.v1.{path.stem}" for path in (root / TREES[package] / "picoord/v1").glob("*_pb2*.py")]
    probe = f"import sys; sys.path.insert(0, {str(root / TREES[package])!r}); " + "; ".join(
        f"import {module}" for module in modules
    )
    run(["/usr/bin/python3", "-I", "-c", probe], 120, env={"PATH": SYSTEM_PATH})


def test_lintian_reports_no_errors_and_no_unexplained_warnings(debs: dict[str, Path]) -> None:
    done = subprocess.run(
        ["lintian", "--tag-display-limit", "0", *map(str, debs.values())],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    tags = [line for line in done.stdout.splitlines() if re.match(r"^[EW]: ", line)]
    assert not tags, "\n".join(tags)


# ---------------------------------------------------------------------------------------
# Installed for real, in a booted Debian 12.


def debian_mirror() -> str:
    paths = [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]
    mirror = mirror_from_sources([path.read_text() for path in paths if path.is_file()])
    if not mirror:
        pytest.fail("no Debian archive in /etc/apt/sources.list*: the install test needs one", pytrace=False)
    return mirror


def base_root() -> Path:
    """A bookworm minbase root with systemd, from debootstrap: built once, then reused
    (read-only, as an overlay's lower layer) for as long as its recipe is unchanged."""
    for tool, package in (("debootstrap", "debootstrap"), ("systemd-nspawn", "systemd-container")):
        if not shutil.which(tool):
            pytest.fail(f"{tool} is missing: apt-get install {package}", pytrace=False)
    mirror = debian_mirror()
    recipe = json.dumps({"suite": SUITE, "variant": "minbase", "include": BASE_PACKAGES, "mirror": mirror})
    root = CACHE_DIR / f"{SUITE}-{hashlib.sha256(recipe.encode()).hexdigest()[:12]}"
    CACHE_DIR.mkdir(mode=0o700, parents=True, exist_ok=True)
    with open(CACHE_DIR / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (root / "etc" / "debian_version").is_file():
            partial = root.with_name(root.name + ".partial")
            shutil.rmtree(partial, ignore_errors=True)
            run(
                [
                    "debootstrap",
                    "--variant=minbase",
                    f"--include={','.join(BASE_PACKAGES)}",
                    SUITE,
                    str(partial),
                    mirror,
                ],
                900,
            )
            (partial / "recipe.json").write_text(recipe)
            partial.rename(root)
    return root


def waiting_for_apt_locks(
    attempt: Callable[[], subprocess.CompletedProcess[str]], timeout: float = 600
) -> subprocess.CompletedProcess[str]:
    """attempt() again while apt says a lock is held: the archive cache in CACHE_DIR is
    shared with other tests running at the same time (the arm64 lab roots, other checkouts)."""
    deadline = time.monotonic() + timeout
    while True:
        done = attempt()
        if "Could not get lock" not in done.stderr or time.monotonic() > deadline:
            return done
        time.sleep(5)


def run_apt(argv: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    """`run` for an apt command on the host (e.g. apt-get in a root through nspawn),
    waiting while the shared archive cache is locked."""
    done = waiting_for_apt_locks(
        lambda: subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    )
    if done.returncode:
        raise AssertionError(f"{argv} exited {done.returncode}:\n{done.stdout}\n{done.stderr}")
    return done


# Legacy cgroup hierarchy (this machine): nspawn --keep-unit puts the container where its
# caller is, so two booted containers at once would share /system.slice/picoord-*.service
# and break each other's units. Each container gets its own name=systemd cgroup instead.
LEGACY_SYSTEMD_CGROUP = Path("/sys/fs/cgroup/systemd")


class Container:
    """A Debian root as an overlay over the cached base, and systemd booted in it.

    `base` may also be several lower dirs, top first (an arm64 agent layer over its base:
    bench/agent_footprint.py runs the installed agent in either root)."""

    def __init__(self, work: Path, base: Path | Sequence[Path]) -> None:
        lower = ":".join(map(str, [base] if isinstance(base, Path) else base))
        self.work = work
        self.root = work / "merged"
        self.machine = f"picoord-test-{os.getpid()}"
        self.nspawn: subprocess.Popen[bytes] | None = None
        self.leader = 0
        self.boot_flags: tuple[str, ...] = ()  # more systemd-nspawn options for every boot
        self.archives = CACHE_DIR / "apt-archives"  # downloaded .debs, kept between runs
        for name in ("upper", "overlay-work", "merged"):
            (work / name).mkdir()
        self.archives.mkdir(exist_ok=True)
        run(
            [
                "mount",
                "-t",
                "overlay",
                "overlay",
                "-o",
                f"lowerdir={lower},upperdir={work / 'upper'},workdir={work / 'overlay-work'}",
                str(self.root),
            ],
            60,
        )

    def nspawn_argv(self, *extra: str) -> list[str]:
        return [
            "systemd-nspawn",
            "--quiet",
            f"--directory={self.root}",
            f"--machine={self.machine}",
            "--register=no",  # no machined here
            "--keep-unit",  # and no systemd on the host to make a scope
            f"--bind={self.archives}:/var/cache/apt/archives",
            *extra,
        ]

    def prepare(self, debs: list[Path]) -> None:
        """Before boot, on the host's network: Debian's package lists, and the packages the
        debs depend on downloaded (not installed), so apt resolves them from Debian later,
        inside the booted container that has no network."""
        (self.root / "root" / "debs").mkdir(exist_ok=True)
        apt = ["--pipe", "--setenv=DEBIAN_FRONTEND=noninteractive", "--chdir=/root/debs", "--", "apt-get"]
        run_apt(self.nspawn_argv(*apt, "update", "-q"), 600)
        for deb in debs:
            shutil.copy(deb, self.root / "root" / "debs")
        names = [f"./{deb.name}" for deb in debs]
        run_apt(
            self.nspawn_argv(*apt, "install", "-y", "-q", "--download-only", *names, *EXTRA_PACKAGES), 900
        )

    @property
    def cgroup(self) -> Path | None:
        """The container's own name=systemd cgroup, on a legacy hierarchy; None on cgroup v2."""
        if not (LEGACY_SYSTEMD_CGROUP / "cgroup.procs").exists():
            return None
        return LEGACY_SYSTEMD_CGROUP / self.machine

    def boot(self) -> None:
        cgroup = self.cgroup
        if cgroup is not None:
            cgroup.mkdir(exist_ok=True)

        def enter_cgroup() -> None:
            if cgroup is not None:
                (cgroup / "cgroup.procs").write_text(str(os.getpid()))

        with open(self.work / "console.log", "ab") as console:
            self.nspawn = subprocess.Popen(
                self.nspawn_argv("--boot", "--private-network", "--console=passive", *self.boot_flags),
                stdin=subprocess.DEVNULL,
                stdout=console,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=enter_cgroup,  # one write before exec
            )
        # nspawn's first child sets up the namespaces and exits; its own child execs systemd.
        deadline = time.monotonic() + 60
        while not self.leader:
            assert self.nspawn.poll() is None, (self.work / "console.log").read_text()
            assert time.monotonic() < deadline, "the container's systemd never started"
            with contextlib.suppress(OSError, ValueError):
                children = (
                    Path(f"/proc/{self.nspawn.pid}/task/{self.nspawn.pid}/children").read_text().split()
                )
                for child in children:
                    if Path(f"/proc/{child}/comm").read_text().strip() == "systemd":
                        self.leader = int(child)
            time.sleep(0.2)
        # Until systemd's private bus is up, systemctl prints nothing on stdout.
        while not (state := self.sh("systemctl", "is-system-running", check=False).stdout.strip()):
            assert time.monotonic() < deadline, "systemd in the container never answered"
            time.sleep(0.2)
        state = self.sh("systemctl", "is-system-running", "--wait", check=False, timeout=120).stdout.strip()
        assert state == "running", (
            f"system state {state}:\n{self.sh('systemctl', '--failed', check=False).stdout}"
        )

    def command(self, *argv: str) -> list[str]:
        """The host's argv that runs argv inside the booted container."""
        command = ["nsenter", f"--target={self.leader}", "--mount", "--uts", "--ipc", "--net", "--pid"]
        command += ["--root", "--wd", "--", "/usr/bin/env", "-i", f"PATH={SYSTEM_PATH}", "LANG=C.UTF-8"]
        return [*command, "DEBIAN_FRONTEND=noninteractive", *argv]

    def sh(
        self, *argv: str, check: bool = True, timeout: float = 120, stdin: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run argv inside the booted container (its namespaces, a clean environment)."""
        done = subprocess.run(
            self.command(*argv), input=stdin, capture_output=True, text=True, timeout=timeout, check=False
        )
        if check and done.returncode:
            raise AssertionError(
                f"in the container, {list(argv)} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
            )
        return done

    def writable_cgroup_controllers(self) -> None:
        """On a cgroup v1 host, systemd-nspawn mounts the controllers read-only in the
        container, so runc (under the container's dockerd) cannot make a container's
        cgroups: remount them writable (a bind remount: only the container's view
        changes). Nothing to do on a cgroup v2 host, where nspawn delegates a subtree."""
        mounts = self.sh("findmnt", "-rn", "-t", "cgroup", "-o", "TARGET,OPTIONS", check=False).stdout
        for line in mounts.splitlines():
            target, options = line.split()
            if "ro" in options.split(","):
                self.sh("mount", "-o", "remount,bind,rw", target)

    def apt(
        self, *args: str, check: bool = True, timeout: float = 600, stdin: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        """apt-get ARGS inside the container, waiting while the shared archive cache is locked."""
        done = waiting_for_apt_locks(
            lambda: self.sh("apt-get", *args, check=False, timeout=timeout, stdin=stdin)
        )
        if check and done.returncode:
            raise AssertionError(
                f"in the container, apt-get {list(args)} exited {done.returncode}:\n"
                f"{done.stdout}\n{done.stderr}"
            )
        return done

    def poweroff(self) -> None:
        """Shut systemd down cleanly (SIGTERM to nspawn), or kill the container."""
        if self.nspawn is None:
            return
        if self.nspawn.poll() is None:
            self.nspawn.send_signal(signal.SIGTERM)
            try:
                self.nspawn.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.nspawn.pid, signal.SIGKILL)  # its children die with it (PDEATHSIG)
                self.nspawn.wait(30)
        self.nspawn, self.leader = None, 0

    def destroy(self) -> None:
        self.poweroff()
        cgroup = self.cgroup
        if cgroup is not None and cgroup.is_dir():  # empty once systemd is gone: deepest first
            for below, _, _ in sorted(os.walk(cgroup), key=lambda entry: -len(entry[0])):
                with contextlib.suppress(OSError):
                    os.rmdir(below)
        subprocess.run(["umount", str(self.root)], capture_output=True, timeout=60, check=False)
        if os.path.ismount(self.root):
            subprocess.run(["umount", "--lazy", str(self.root)], capture_output=True, timeout=60, check=False)
        with contextlib.suppress(OSError):
            Path("/run/systemd/nspawn/propagate", self.machine).rmdir()
        shutil.rmtree(self.work, ignore_errors=True)

    # What the test looks at.

    def file_digest(self, path: str) -> str:
        return hashlib.sha256((self.root / path.lstrip("/")).read_bytes()).hexdigest()

    def show(self, unit: str, prop: str) -> str:
        return self.sh("systemctl", "show", unit, f"--property={prop}", "--value").stdout.strip()

    def journal(self, unit: str, lines: int = 40) -> str:
        return self.sh("journalctl", "-u", unit, "--no-pager", "-n", str(lines), check=False).stdout

    def systemctl(self, action: str, unit: str) -> None:
        """`systemctl ACTION UNIT`; a failure raises with the unit's journal."""
        done = self.sh("systemctl", action, unit, check=False)
        assert done.returncode == 0, f"systemctl {action} {unit}: {done.stderr}\n{self.journal(unit)}"

    def wait_active(self, unit: str, timeout: float = 60) -> str:
        deadline = time.monotonic() + timeout
        while (state := self.sh("systemctl", "is-active", unit, check=False).stdout.strip()) != "active":
            if time.monotonic() > deadline:
                raise AssertionError(f"{unit} is {state}, not active:\n{self.journal(unit)}")
            time.sleep(0.5)
        return self.show(unit, "MainPID")

    def wait_node_ready(self, name: str, timeout: float = 60) -> dict[str, object]:
        deadline = time.monotonic() + timeout
        while True:
            done = self.sh("coordctl", "nodes", "-o", "json", check=False)
            nodes = {node["name"]: node for node in json.loads(done.stdout)} if done.returncode == 0 else {}
            if nodes.get(name, {}).get("status") == "Ready":
                return nodes[name]
            if time.monotonic() > deadline:
                raise AssertionError(f"node {name} not Ready: {done.stdout}{done.stderr}")
            time.sleep(1)


@pytest.fixture
def container(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Container]:
    require_root_or_fail()
    base = base_root()
    made = Container(tmp_path_factory.mktemp("container"), base)
    try:
        yield made
    finally:
        made.destroy()
        assert not os.path.ismount(made.root), f"{made.root} is still mounted"


# Debian packages for the node actions the test runs under the agent's unit.
EXTRA_PACKAGES = ("nftables", "docker.io", "docker-registry")
# Node actions under the unit's confinement: mounts the host must see (no private mount
# namespace) and an nftables policy (netlink), in the container's own network namespace.
NODE_SPEC = """\
kind: Mount
name: scratch
type: tmpfs
source: tmpfs
target: /mnt/picoord-scratch
nodes: [pi-deb]
---
kind: Mount
name: data
type: bind
source: /srv/picoord-data
target: /mnt/picoord-data
nodes: [pi-deb]
---
kind: FirewallPolicy
name: node
nodes: [pi-deb]
backend: nftables
default_incoming: deny
rules:
  - {action: allow, port: 22, protocol: tcp, comment: ssh}
"""
# A replica started by the agent under its unit through the container's own dockerd, with
# a bind volume and a published port, probed over HTTP. Its image is pulled by that dockerd
# at the agent's request from Debian's docker-registry in the container (the booted
# container has no other network): the lab's mcp:1 stand-in, pushed there first.
LOCAL_REGISTRY = "127.0.0.1:5000"  # docker-registry's default; dockerd trusts 127.0.0.0/8
WEB_SPEC = f"""\
apiVersion: picoord/v1
kind: Service
name: web
image: {LOCAL_REGISTRY}/mcp:1
replicas: 1
ports:
  - {{target: 8080, published: 8080}}
volumes:
  - {{type: bind, source: /srv/picoord-www, target: /www/data, read_only: true}}
health:
  http: {{path: /health, port: 8080}}
  interval: 1s
  timeout: 1s
  retries: 2
"""
# For runc under the container's dockerd: nspawn's own seccomp filter refuses the keyring
# calls runc makes for each container (EPERM: "unable to join session keyring").
DOCKER_BOOT_FLAGS = ("--system-call-filter=add_key keyctl bpf",)
NODE = "pi-deb"
AGENT_STATE = "/var/lib/picoord/agent"
ENROLLMENT_FILES = ("node.pem", "ca.crt", "enrollment.json")  # key and certificate in one file


def join_node(container: Container, *extra: str) -> None:
    """Enrollment, as the README says: a token from coordctl, then `picoord-agent join` with
    the token in a 0600 file."""
    printed = container.sh("coordctl", "token", "create", "--ttl", "10m").stdout
    token = re.search(r"--token (\S+)", printed)
    ca_hash = re.search(r"--ca-cert-hash (sha256:[0-9a-f]+)", printed)
    assert token and ca_hash, printed
    token_file = container.root / "root" / "join-token"
    token_file.write_text(token.group(1))
    token_file.chmod(0o600)
    try:
        container.sh(
            "picoord-agent", "join", "127.0.0.1:7443", "--token-file", "/root/join-token",
            "--ca-cert-hash", ca_hash.group(1), "--node-name", NODE, *extra,
        )  # fmt: skip
    finally:
        token_file.unlink()


@pytest.fixture(scope="module")
def upgrade_debs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The same tree as UPGRADE_VERSION, to upgrade to."""
    return build_debs(tmp_path_factory.mktemp("upgrade-debs"), UPGRADE_VERSION)


def test_installed_from_the_debs_in_a_booted_debian(
    container: Container, debs: dict[str, Path], upgrade_debs: dict[str, Path]
) -> None:
    upgrade = upgrade_debs
    container.prepare([*debs.values(), *upgrade.values()])
    container.boot_flags = DOCKER_BOOT_FLAGS
    container.boot()

    # Installed with apt while systemd runs: dependencies come from Debian's lists; the
    # coordinator is enabled and started, the agent (not enrolled yet) only installed.
    container.apt("install", "-y", "-q", *[f"/root/debs/{deb.name}" for deb in debs.values()], timeout=600)
    container.wait_active("picoord-coordinator")
    assert (
        container.sh("systemctl", "is-enabled", "picoord-coordinator", check=False).stdout.strip()
        == "enabled"
    )
    assert container.sh("systemctl", "is-enabled", "picoord-agent", check=False).stdout.strip() == "disabled"
    assert container.sh("systemctl", "is-active", "picoord-agent", check=False).stdout.strip() == "inactive"
    assert container.show("picoord-coordinator", "Type") == "notify"
    for directory in ("/var/lib/picoord", AGENT_STATE):
        assert (container.root / directory.lstrip("/")).stat().st_mode & 0o777 == 0o700, directory
    coordinator_watchdog = container.show("picoord-coordinator", "WatchdogTimestampMonotonic")

    # Enrollment, as the README says: token, join (token from a 0600 file), enable --now.
    join_node(container)
    container.sh("systemctl", "enable", "--now", "picoord-agent")
    agent_pid = container.wait_active("picoord-agent")
    node = container.wait_node_ready(NODE)
    assert node["agent_version"] == VERSION
    enrollment = {name: container.file_digest(f"{AGENT_STATE}/{name}") for name in ENROLLMENT_FILES}

    # Both daemons told systemd they are ready and keep feeding the watchdog.
    assert container.show("picoord-agent", "WatchdogUSec") == "1min"
    time.sleep(16)  # > WatchdogSec/2 of the coordinator (30 s): at least one more ping
    assert container.show("picoord-coordinator", "WatchdogTimestampMonotonic") != coordinator_watchdog

    # Node actions under the unit: the mount reaches the container's own mount table and
    # the firewall is changed and confirmed over a new connection to the coordinator.
    container.apt("install", "-y", "-q", *EXTRA_PACKAGES, timeout=600)
    (container.root / "root" / "node.yaml").write_text(NODE_SPEC)
    data = container.root / "srv" / "picoord-data"
    data.mkdir(parents=True)
    (data / "marker").write_text("bound\n")
    applied = container.sh("coordctl", "apply", "-f", "/root/node.yaml", check=False, timeout=180)
    assert applied.returncode == 0, applied.stdout + applied.stderr
    assert container.sh("findmnt", "-n", "-o", "FSTYPE", "/mnt/picoord-scratch").stdout.strip() == "tmpfs"
    assert container.sh("cat", "/mnt/picoord-data/marker").stdout == "bound\n"
    assert "dport 22" in container.sh("nft", "list", "ruleset").stdout

    # systemctl restart: new processes, the node back to Ready.
    for unit in ("picoord-coordinator", "picoord-agent"):
        before = container.show(unit, "MainPID")
        container.sh("systemctl", "restart", unit)
        assert container.wait_active(unit) != before
    container.wait_node_ready(NODE)
    assert container.show("picoord-agent", "NRestarts") == "0"
    assert container.sh("findmnt", "/mnt/picoord-scratch", check=False).returncode == 0, (
        "the mount must outlive it"
    )

    # The watchdogs, shortened to 3 s by runtime drop-ins (gone at the reboot below): pings
    # every 1.5 s keep both daemons up; a hung coordinator (SIGSTOP) is killed and restarted.
    for unit in ("picoord-coordinator", "picoord-agent"):
        container.sh("mkdir", "-p", f"/run/systemd/system/{unit}.service.d")
        container.sh(
            "tee", f"/run/systemd/system/{unit}.service.d/watchdog.conf",
            stdin="[Service]\nWatchdogSec=3s\nTimeoutAbortSec=2s\nRestartSec=1s\n",
        )  # fmt: skip
    container.sh("systemctl", "daemon-reload")
    for unit in ("picoord-coordinator", "picoord-agent"):
        container.systemctl("restart", unit)
    pids = {unit: container.wait_active(unit) for unit in ("picoord-coordinator", "picoord-agent")}
    time.sleep(8)
    assert {unit: container.wait_active(unit) for unit in pids} == pids, (
        "a watchdog fired on a healthy daemon"
    )
    assert container.show("picoord-coordinator", "NRestarts") == "0"
    container.sh("systemctl", "kill", "--kill-whom=main", "--signal=SIGSTOP", "picoord-coordinator")
    deadline = time.monotonic() + 30
    while container.show("picoord-coordinator", "NRestarts") == "0":
        assert time.monotonic() < deadline, "the hung coordinator was not restarted"
        time.sleep(0.5)
    assert container.wait_active("picoord-coordinator") != pids["picoord-coordinator"]
    journal = container.sh("journalctl", "-u", "picoord-coordinator", "--no-pager", "-o", "cat").stdout
    assert "Watchdog timeout" in journal, journal[-2000:]
    container.wait_node_ready(NODE)

    # A reboot: both enabled, both back.
    container.poweroff()
    container.boot()
    container.wait_active("picoord-coordinator")
    agent_pid = container.wait_active("picoord-agent")
    container.wait_node_ready(NODE)

    # An upgrade, with a locally changed conffile: kept without a question, enrollment
    # untouched, both daemons restarted on the new version.
    agent_config = container.root / "etc/picoord/agent.toml"
    agent_config.write_text(agent_config.read_text().replace('#log_level = "info"', 'log_level = "debug"'))
    local_config = agent_config.read_text()
    coordinator_pid = container.show("picoord-coordinator", "MainPID")
    container.apt("install", "-y", "-q", *[f"/root/debs/{deb.name}" for deb in upgrade.values()], timeout=600)
    versions = container.sh("dpkg-query", "--show", "--showformat=${Version} ", *PACKAGES).stdout.split()
    assert versions == [UPGRADE_VERSION, UPGRADE_VERSION]
    assert container.wait_active("picoord-coordinator") != coordinator_pid
    assert container.wait_active("picoord-agent") != agent_pid
    assert agent_config.read_text() == local_config
    assert {name: container.file_digest(f"{AGENT_STATE}/{name}") for name in ENROLLMENT_FILES} == enrollment
    container.wait_node_ready(NODE)

    # Docker under the unit: the agent (upgraded, still under the unit's seccomp filter and
    # address families) has the container's dockerd pull an image, creates and starts a
    # replica with a bind volume and a published port, and probes it healthy. Last, so that
    # no reboot finds a replica whose cgroups dockerd could not make again.
    families = container.show("picoord-agent", "RestrictAddressFamilies")
    assert families == "AF_INET AF_INET6 AF_NETLINK AF_PACKET AF_UNIX"  # AF_PACKET: keepalived's ARP
    assert container.sh(
        "grep", "^Seccomp:", f"/proc/{container.show('picoord-agent', 'MainPID')}/status"
    ).stdout.split() == ["Seccomp:", "2"]
    container.writable_cgroup_controllers()
    mcp = next(stand_in for stand_in in stand_ins() if (stand_in.repository, stand_in.tag) == ("mcp", "1"))
    (container.root / "root" / "mcp.tar").write_bytes(
        docker_archive(build_image(mcp, BUSYBOX.read_bytes(), host_architecture()))
    )
    container.sh("docker", "load", "-i", "/root/mcp.tar", timeout=180)
    # Debian's registry config asks for htpasswd logins: serve as the lab registry does.
    config = registry_config(Path("/var/lib/docker-registry"), LOCAL_REGISTRY)
    (container.root / "etc/docker/registry/config.yml").write_text(config)
    container.sh("systemctl", "restart", "docker-registry")
    container.wait_active("docker-registry")
    fetch = "import sys, urllib.request as u; sys.stdout.write(u.urlopen(sys.argv[1]).read().decode())"
    deadline = time.monotonic() + 30
    while container.sh("python3", "-c", fetch, f"http://{LOCAL_REGISTRY}/v2/", check=False).returncode:
        assert time.monotonic() < deadline, "docker-registry does not answer on " + LOCAL_REGISTRY
        time.sleep(0.5)
    pulled = f"{LOCAL_REGISTRY}/mcp:1"
    container.sh("docker", "tag", "mcp:1", pulled)
    container.sh("docker", "push", pulled, timeout=180)
    container.sh("docker", "rmi", "mcp:1", pulled)  # the agent's start must pull it
    www = container.root / "srv" / "picoord-www"
    www.mkdir(parents=True)
    (www / "marker").write_text("served from a bind volume\n")
    (container.root / "root" / "web.yaml").write_text(WEB_SPEC)
    container.sh("coordctl", "apply", "-f", "/root/web.yaml", timeout=60)
    container.sh("coordctl", "rollout", "web", timeout=240)
    replicas = json.loads(container.sh("coordctl", "ps", "web", "-o", "json").stdout)
    assert [(r["node"], r["state"], r["health"]) for r in replicas if r["desired"] == "running"] == [
        (NODE, "running", "healthy")
    ], replicas
    # Published ports are answered on the node's addresses by its nftables DNAT, never on
    # 127.0.0.1 (a loopback source cannot be forwarded: docs/service-ports.md), and this
    # container has loopback only: the replica is asked at its own address.
    replica_id = container.sh(
        "docker", "ps", "-q", "--filter", "label=org.picoord.service=web"
    ).stdout.split()
    address = container.sh(
        "docker",
        "inspect",
        "--format",
        "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}",
        *replica_id,
    ).stdout.strip()
    served = container.sh("python3", "-c", fetch, f"http://{address}:8080/data/marker").stdout
    assert served == "served from a bind volume\n"
    assert container.sh("docker", "image", "inspect", "--format", "{{.Id}}", pulled).stdout.startswith(
        "sha256:"
    )
    assert container.show("picoord-agent", "NRestarts") == "0"

    # remove keeps the state (and the agent's config); purge deletes it.
    container.apt("remove", "-y", "-q", AGENT)
    assert container.sh("systemctl", "is-active", "picoord-agent", check=False).stdout.strip() != "active"
    assert (container.root / AGENT_STATE.lstrip("/") / "node.pem").is_file()
    container.apt("purge", "-y", "-q", AGENT)
    assert not (container.root / AGENT_STATE.lstrip("/")).exists()
    assert (container.root / "var/lib/picoord/state.db").is_file(), "the coordinator's state must stay"
    container.apt("purge", "-y", "-q", COORDINATOR)
    assert not (container.root / "var/lib/picoord").exists()
    assert not (container.root / "etc/picoord").exists()


# ---------------------------------------------------------------------------------------
# Faults, in one booted container: what the operator sees in systemctl and the journal, and
# that each unit comes back by itself, or after the fix the message names.

EXIT_CONFIG = "78"  # common/defaults.py EXIT_CONFIG; the units' RestartPreventExitStatus=


def with_changed_conffile(deb: Path, out: Path, path: str, extra: str) -> Path:
    """A copy of `deb` whose conffile `path` has `extra` appended: what a new upstream
    version that documents one more setting looks like to dpkg."""
    tree = out / "tree"
    run(["dpkg-deb", "--raw-extract", str(deb), str(tree)], 60)
    conffile = tree / path.lstrip("/")
    conffile.write_text(conffile.read_text() + extra)
    digest = hashlib.md5(conffile.read_bytes()).hexdigest()  # dpkg's md5sums format
    sums = tree / "DEBIAN" / "md5sums"
    sums.write_text(
        re.sub(rf"(?m)^[0-9a-f]{{32}}(  {re.escape(path.lstrip('/'))})$", rf"{digest}\1", sums.read_text())
    )
    built = out / deb.name
    run(["dpkg-deb", "--root-owner-group", "--build", str(tree), str(built)], 120)
    shutil.rmtree(tree)
    return built


def unit_failed_for_config(container: Container, unit: str, wait: float = 8) -> str:
    """Assert `unit` failed with EXIT_CONFIG and stays failed (no restart loop: RestartSec is
    5 s); return the journal's lines of its last start."""
    deadline = time.monotonic() + 30
    while container.sh("systemctl", "is-failed", unit, check=False).stdout.strip() != "failed":
        assert time.monotonic() < deadline, container.sh("systemctl", "status", unit, check=False).stdout
        time.sleep(0.5)
    restarts = container.show(unit, "NRestarts")
    time.sleep(wait)
    assert container.sh("systemctl", "is-failed", unit, check=False).stdout.strip() == "failed"
    assert container.show(unit, "NRestarts") == restarts, "restarted in a loop over a config error"
    assert container.show(unit, "ExecMainStatus") == EXIT_CONFIG
    invocation = container.show(unit, "InvocationID")
    return container.sh(
        "journalctl", f"_SYSTEMD_INVOCATION_ID={invocation}", "--no-pager", "-o", "cat", check=False
    ).stdout


def status_text(container: Container, unit: str, wanted: str, timeout: float = 60) -> str:
    """Wait for the unit's status line (sd_notify STATUS=) to contain `wanted`."""
    deadline = time.monotonic() + timeout
    while wanted not in (text := container.show(unit, "StatusText")):
        assert time.monotonic() < deadline, f"{unit} status is {text!r}, not {wanted!r}"
        time.sleep(0.5)
    return text


def test_package_faults_in_a_booted_debian(
    container: Container,
    debs: dict[str, Path],
    upgrade_debs: dict[str, Path],
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    changed = with_changed_conffile(
        upgrade_debs[AGENT],
        tmp_path_factory.mktemp("changed-conffile"),
        "/etc/picoord/agent.toml",
        "\n# A setting documented by a newer version.\n",
    )
    container.prepare([*debs.values(), *upgrade_debs.values()])
    (container.root / "root" / "changed").mkdir()
    shutil.copy(changed, container.root / "root" / "changed")
    container.boot()
    container.apt("install", "-y", "-q", *[f"/root/debs/{deb.name}" for deb in debs.values()], timeout=600)
    container.wait_active("picoord-coordinator")

    # d) Enabled before the join: active, not failing, and its status says what to run.
    container.sh("systemctl", "enable", "--now", "picoord-agent")
    waiting_pid = container.wait_active("picoord-agent")
    waiting = status_text(container, "picoord-agent", "not joined")
    assert "picoord-agent join HOST:7443 --token" in waiting, waiting
    time.sleep(6)  # > RestartSec: a unit that failed would have restarted by now
    assert container.show("picoord-agent", "NRestarts") == "0"
    # The join while it waits: the same process goes on, enrolls, and the node is Ready.
    join_node(container)
    container.wait_node_ready(NODE)
    assert container.show("picoord-agent", "MainPID") == waiting_pid
    status_text(container, "picoord-agent", "connected to 127.0.0.1:7443")
    enrollment = {name: container.file_digest(f"{AGENT_STATE}/{name}") for name in ENROLLMENT_FILES}

    # d) The coordinator out of reach: the agent stays active, says so, and comes back.
    container.sh("systemctl", "stop", "picoord-coordinator")
    status_text(container, "picoord-agent", "coordinator unreachable, retrying")
    assert container.sh("systemctl", "is-active", "picoord-agent", check=False).stdout.strip() == "active"
    container.systemctl("start", "picoord-coordinator")
    container.wait_node_ready(NODE, timeout=90)
    status_text(container, "picoord-agent", "connected to")
    assert container.show("picoord-agent", "NRestarts") == "0"

    # a) A corrupted agent.toml: failed with 78, not restarted, one line naming file, line
    # and fix; back by itself once saved fixed.
    agent_config = container.root / "etc/picoord/agent.toml"
    shipped = agent_config.read_text()
    agent_config.write_text(shipped.replace('#log_level = "info"', 'log_level = "info'))
    line = agent_config.read_text().splitlines().index('log_level = "info') + 1
    container.sh("systemctl", "restart", "picoord-agent", check=False)
    journal = unit_failed_for_config(container, "picoord-agent")
    assert "/etc/picoord/agent.toml: cannot read it as TOML" in journal, journal
    assert f"at line {line}" in journal and "systemctl restart picoord-agent" in journal, journal
    agent_config.write_text(shipped.replace('#log_level = "info"', 'log_level = "loud"'))
    container.sh("systemctl", "restart", "picoord-agent", check=False)
    journal = unit_failed_for_config(container, "picoord-agent", wait=0)
    assert f"/etc/picoord/agent.toml line {line}: log_level = 'loud' is invalid" in journal, journal
    # Saved fixed, it starts by itself (picoord-agent-config.path): no `systemctl restart`.
    agent_config.write_text(shipped)
    container.wait_active("picoord-agent")
    container.wait_node_ready(NODE)
    # An agent the operator stopped stays stopped, whatever is saved.
    container.systemctl("stop", "picoord-agent")
    agent_config.write_text(shipped)
    time.sleep(3)
    assert container.sh("systemctl", "is-active", "picoord-agent", check=False).stdout.strip() == "inactive"
    container.systemctl("start", "picoord-agent")
    container.wait_node_ready(NODE)

    # a) The same for coordinator.toml, a value of the wrong type.
    coordinator_config = container.root / "etc/picoord/coordinator.toml"
    shipped_coordinator = coordinator_config.read_text()
    coordinator_config.write_text(shipped_coordinator + 'heartbeat_timeout = "soon"\n')
    container.sh("systemctl", "restart", "picoord-coordinator", check=False)
    journal = unit_failed_for_config(container, "picoord-coordinator")
    line = len(coordinator_config.read_text().splitlines())
    assert (
        f"/etc/picoord/coordinator.toml line {line}: heartbeat_timeout = 'soon' must be a number" in journal
    )
    coordinator_config.write_text(shipped_coordinator)  # starts it again by itself
    container.wait_active("picoord-coordinator")
    container.wait_node_ready(NODE, timeout=90)

    # c) The agent's certificate deleted: no fail loop; the status names what is missing and
    # the fix, and putting it back (a backup) is picked up without a restart.
    node_pem = container.root / AGENT_STATE.lstrip("/") / "node.pem"
    saved = node_pem.read_bytes()
    node_pem.unlink()
    container.systemctl("restart", "picoord-agent")
    text = status_text(container, "picoord-agent", "incomplete (node.pem missing)")
    assert "coordctl node remove" in text and "--force" in text, text
    pid = container.wait_active("picoord-agent")
    node_pem.write_bytes(saved)
    node_pem.chmod(0o600)
    container.wait_node_ready(NODE)
    assert container.show("picoord-agent", "MainPID") == pid

    # c) The coordinator's CA key gone while its certificate is there: refused, naming the
    # fix; no new CA over the cluster's; back once the key is restored.
    state = container.root / "var/lib/picoord"
    ca_cert = container.file_digest("/var/lib/picoord/ca.crt")
    (state / "ca.key").rename(container.root / "root" / "ca.key.backup")
    container.sh("systemctl", "restart", "picoord-coordinator", check=False)
    journal = unit_failed_for_config(container, "picoord-coordinator")
    assert "/var/lib/picoord/ca.key is missing while /var/lib/picoord/ca.crt is there" in journal, journal
    assert "Restore /var/lib/picoord/ca.key from your backup" in journal, journal
    assert not (state / "ca.key").exists() and container.file_digest("/var/lib/picoord/ca.crt") == ca_cert
    (container.root / "root" / "ca.key.backup").rename(state / "ca.key")  # back by itself
    container.wait_active("picoord-coordinator")
    container.wait_node_ready(NODE, timeout=90)

    # b) The state directory world-writable, or owned by another user: the agent refuses
    # (78) naming the path and the fix; the package's configure step repairs the mode and
    # says so, and leaves the owner for the operator.
    state.chmod(0o777)
    container.sh("systemctl", "restart", "picoord-agent", check=False)
    journal = unit_failed_for_config(container, "picoord-agent", wait=0)
    assert "/var/lib/picoord, above the state directory /var/lib/picoord/agent, is writable" in journal
    assert "chmod go-w /var/lib/picoord" in journal, journal
    reconfigured = container.sh("dpkg-reconfigure", "picoord-agent")
    assert "/var/lib/picoord was mode 777 (writable by group or others); set to 0700" in reconfigured.stdout
    assert state.stat().st_mode & 0o777 == 0o700
    again = container.sh("dpkg-reconfigure", "picoord-agent")
    assert "set to 0700" not in again.stdout + again.stderr, "the repair is idempotent"
    # The unit's own StateDirectory= is re-owned and set to 0700 by systemd at each start.
    os.chown(state / "agent", 65534, 65534)
    (state / "agent").chmod(0o777)
    container.systemctl("restart", "picoord-agent")
    container.wait_active("picoord-agent")
    info = (state / "agent").stat()
    assert (info.st_uid, info.st_mode & 0o777) == (0, 0o700), "systemd's StateDirectory= repair"
    # The directory above it, owned by another user: refused; configure says so, re-owns nothing.
    os.chown(state, 65534, 65534)
    container.sh("systemctl", "restart", "picoord-agent", check=False)
    journal = unit_failed_for_config(container, "picoord-agent", wait=0)
    assert "above the state directory /var/lib/picoord/agent, belongs to uid 65534" in journal, journal
    assert "chown root /var/lib/picoord" in journal, journal
    reconfigured = container.sh("dpkg-reconfigure", "picoord-agent")
    said = reconfigured.stdout + reconfigured.stderr
    assert "/var/lib/picoord belongs to uid 65534, not root: check its files" in reconfigured.stderr, said
    assert state.stat().st_uid == 65534
    os.chown(state, 0, 0)
    container.systemctl("restart", "picoord-agent")
    container.wait_node_ready(NODE)

    # a) An upgrade whose agent.toml changed while the local one was edited. With no one to
    # answer dpkg's conffile question (no terminal, no --force-conf option) dpkg stops there,
    # as for any Debian package: the edited file is kept, the package is left unpacked and
    # the running agent keeps running. apt's usual unattended options then complete it.
    agent_config.write_text(shipped.replace('#log_level = "info"', 'log_level = "debug"'))
    local = agent_config.read_text()
    changed_deb = f"/root/changed/{changed.name}"
    asked = container.apt("install", "-y", "-q", changed_deb, stdin="", check=False)
    said = asked.stdout + asked.stderr
    assert asked.returncode != 0 and "end of file on stdin at conffile prompt" in said, said
    assert "The default action is to keep your current version" in said
    assert agent_config.read_text() == local
    status = container.sh("dpkg-query", "-W", "-f=${Status} ${Version}", AGENT).stdout
    assert status == f"install ok unpacked {UPGRADE_VERSION}", status
    assert container.sh("systemctl", "is-active", AGENT, check=False).stdout.strip() == "active"
    upgraded = container.apt(
        "install", "-y", "-q", "-o", "Dpkg::Options::=--force-confdef",
        "-o", "Dpkg::Options::=--force-confold", changed_deb,
        stdin="", timeout=600, check=False,
    )  # fmt: skip
    assert upgraded.returncode == 0, upgraded.stdout + upgraded.stderr
    assert agent_config.read_text() == local
    assert (
        "A setting documented by a newer version"
        in (agent_config.parent / "agent.toml.dpkg-dist").read_text()
    )
    container.wait_node_ready(NODE)

    # e) An upgrade killed half-way through configure (its service restart hangs; dpkg is
    # killed): the package is left half-configured; `dpkg --configure -a` completes it,
    # enrollment and config intact, the service back.
    dropin = container.root / "run/systemd/system/picoord-coordinator.service.d"
    dropin.mkdir(parents=True)
    (dropin / "hang.conf").write_text("[Service]\nExecStartPre=/bin/sleep 600\n")
    container.sh("systemctl", "daemon-reload")
    dpkg = subprocess.Popen(
        container.command("dpkg", "-i", f"/root/debs/{upgrade_debs[COORDINATOR].name}"),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # dpkg, its maintainer script and systemctl: one process group
    )
    try:
        deadline = time.monotonic() + 50
        while "half-configured" not in container.sh("dpkg-query", "-W", "-f=${Status}", COORDINATOR).stdout:
            assert dpkg.poll() is None and time.monotonic() < deadline, "dpkg never reached configure"
            time.sleep(0.2)
        time.sleep(1)  # into the service restart
    finally:
        os.killpg(dpkg.pid, signal.SIGKILL)
        dpkg.wait(30)
    assert (
        container.sh("dpkg-query", "-W", "-f=${Status}", COORDINATOR).stdout == "install ok half-configured"
    )
    (dropin / "hang.conf").unlink()
    container.sh("systemctl", "daemon-reload")
    audit = container.sh("dpkg", "--audit", check=False).stdout
    assert COORDINATOR in audit, audit
    container.sh("dpkg", "--configure", "-a", timeout=300)
    assert container.sh("dpkg-query", "-W", "-f=${Status} ${Version}", COORDINATOR).stdout == (
        f"install ok installed {UPGRADE_VERSION}"
    )
    container.wait_active("picoord-coordinator")
    container.wait_node_ready(NODE, timeout=90)
    assert container.file_digest("/var/lib/picoord/ca.crt") == ca_cert
    assert {name: container.file_digest(f"{AGENT_STATE}/{name}") for name in ENROLLMENT_FILES} == enrollment
    assert agent_config.read_text() == local
    assert coordinator_config.read_text() == shipped_coordinator
