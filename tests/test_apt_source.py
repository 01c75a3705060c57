"""The cluster's apt source (`make repo`: packaging/apt/build-repo), used as a node uses it.

Quick (no boot): the repository build_repo writes with apt-ftparchive and gpg verifies with
the key it exports, the key is made once and kept (same key, same exported bytes on the
next build), no private key or gpg-agent is left behind, and a rebuild of a version already
in the repository is refused with the served repository untouched.

For real (root): one booted Debian 12 root (tests/test_packages.py's Container, an overlay
over its cached debootstrap base) is the node. The repository is served from the host side,
by picoord-apt.service's own command line run in the container's network namespace, on
the container's loopback. The node runs the lines build-repo prints (curl the key, check
its digest, write the source), installs picoord-agent from it, refuses an unsigned
repository, one whose Packages changed after signing and one signed by another key (each
with nothing installed or changed), then upgrades to a newer build. Last, the coordinator
package installed from the same source serves the repository itself, under
picoord-apt.service's hardening, to the same node.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import importlib.machinery
import importlib.util
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from picoord.lab.arm64 import build_debs
from tests.conftest import require_root_or_fail
from tests.systemd_verify import make_unit_root, verify
from tests.test_packages import (
    AGENT,
    COORDINATOR,
    UPGRADE_VERSION,
    VERSION,
    Container,
    base_root,
    run,
    run_apt,
)
from tests.test_systemd_units import exposure

REPO_ROOT = Path(__file__).resolve().parent.parent
BUILD_REPO = REPO_ROOT / "packaging" / "apt" / "build-repo"
UNIT = REPO_ROOT / "systemd" / "picoord-apt.service"


def load_build_repo():
    loader = importlib.machinery.SourceFileLoader("build_repo", str(BUILD_REPO))
    module = importlib.util.module_from_spec(importlib.util.spec_from_loader(loader.name, loader))
    loader.exec_module(module)
    return module


build_repo = load_build_repo()
URL = f"http://127.0.0.1:{build_repo.PORT}"
KEYRING = build_repo.INSTALLED_KEYRING
SOURCES = build_repo.SOURCES_FILE


def make_repo(repo: Path, key_dir: Path, debs: list[Path]) -> subprocess.CompletedProcess[str]:
    """`make repo`'s command: build-repo on these debs."""
    return subprocess.run(
        [str(BUILD_REPO), "--repo", str(repo), "--key-dir", str(key_dir), "--url", URL, *map(str, debs)],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip


def tree_digest(top: Path) -> dict[str, str]:
    return {
        str(path.relative_to(top)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(top.rglob("*"))
        if path.is_file()
    }


def agents_of(key_dir: Path) -> list[int]:
    """gpg-agent processes serving `key_dir` (gpg starts one per GnuPG home)."""
    found = []
    for proc in Path("/proc").iterdir():
        with contextlib.suppress(OSError):
            if not proc.name.isdigit() or (proc / "comm").read_text().strip() != "gpg-agent":
                continue
            if str(key_dir) in (proc / "cmdline").read_bytes().decode(errors="replace"):
                found.append(int(proc.name))
    return found


@pytest.fixture(scope="module")
def debs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return build_debs(tmp_path_factory.mktemp("debs"))


@pytest.fixture(scope="module")
def upgrade_debs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return build_debs(tmp_path_factory.mktemp("upgrade-debs"), UPGRADE_VERSION)


# ---------------------------------------------------------------------------------------
# The repository.


def test_the_repository_is_signed_by_a_key_made_once_and_kept(debs: dict[str, Path], tmp_path: Path) -> None:
    repo, key_dir = tmp_path / "repo", tmp_path / "key"
    made = make_repo(repo, key_dir, list(debs.values()))
    assert made.returncode == 0, made.stderr
    assert sorted(path.name for path in (repo / "pool/main").iterdir()) == sorted(
        deb.name for deb in debs.values()
    )
    # apt's own check: the Release file verifies with the exported public key, both ways.
    dist = repo / "dists/stable"
    run(["gpgv", "--keyring", str(repo / "picoord.gpg"), str(dist / "InRelease")], 60)
    run(
        ["gpgv", "--keyring", str(repo / "picoord.gpg"), str(dist / "Release.gpg"), str(dist / "Release")], 60
    )
    for architecture in ("amd64", "arm64"):
        packages = (dist / f"main/binary-{architecture}/Packages").read_text()
        assert f"Package: {AGENT}\n" in packages and f"Package: {COORDINATOR}\n" in packages
        assert (
            gzip.decompress((dist / f"main/binary-{architecture}/Packages.gz").read_bytes()).decode()
            == packages
        )
    # The node is told the key's digest; the private key stays in the 0700 key directory.
    digest = hashlib.sha256((repo / "picoord.gpg").read_bytes()).hexdigest()
    assert f"sha256sum {KEYRING}   # must print {digest}" in made.stdout
    assert (key_dir.stat().st_mode & 0o777) == 0o700
    (tmp_path / "probe").mkdir(mode=0o700)  # an empty GnuPG home, only to parse packets
    packets = run(
        ["gpg", "--homedir", str(tmp_path / "probe"), "--list-packets", str(repo / "picoord.gpg")], 60
    )
    assert ":public key packet:" in packets.stdout and "secret" not in packets.stdout
    assert "PRIVATE KEY" not in made.stdout + made.stderr
    assert not agents_of(key_dir), "build-repo left a gpg-agent running"
    shutil.rmtree(tmp_path / "probe", ignore_errors=True)
    # Built again: the same key, the same exported bytes, nothing new in the pool.
    again = make_repo(repo, key_dir, list(debs.values()))
    assert again.returncode == 0, again.stderr
    assert "added" not in again.stdout
    assert hashlib.sha256((repo / "picoord.gpg").read_bytes()).hexdigest() == digest
    assert again.stdout.split("signed by key ")[1][:40] == made.stdout.split("signed by key ")[1][:40]


def test_a_rebuild_of_a_version_already_served_is_refused_and_changes_nothing(
    debs: dict[str, Path], tmp_path: Path
) -> None:
    repo, key_dir = tmp_path / "repo", tmp_path / "key"
    assert make_repo(repo, key_dir, list(debs.values())).returncode == 0
    before = tree_digest(repo)
    rebuilt = tmp_path / debs[AGENT].name
    rebuilt.write_bytes(debs[AGENT].read_bytes() + b"\0")
    refused = make_repo(repo, key_dir, [rebuilt])
    assert refused.returncode == 1
    assert f"already holds {debs[AGENT].name} with other contents" in refused.stderr
    assert "make deb DEB_VERSION=" in refused.stderr
    assert tree_digest(repo) == before
    assert not repo.with_name("repo.new").exists()
    # Bad input at the edge: named, nothing changed, no key made.
    bad_url = subprocess.run(
        [str(BUILD_REPO), "--repo", str(tmp_path / "other"), "--key-dir", str(tmp_path / "other-key"),
         "--url", "ftp://desktop", str(debs[AGENT])],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert (
        bad_url.returncode == 1 and "--url 'ftp://desktop' must look like http://HOST:PORT" in bad_url.stderr
    )
    assert not (tmp_path / "other").exists() and not (tmp_path / "other-key").exists()
    stranger = tmp_path / "docker.io_20.10_all.deb"
    stranger.write_bytes(b"not ours")
    named = make_repo(tmp_path / "other", tmp_path / "other-key", [stranger])
    assert named.returncode == 1 and "'docker.io' is not one of" in named.stderr
    assert not (tmp_path / "other").exists() and not (tmp_path / "other-key").exists()
    inside = make_repo(repo, repo / "key", list(debs.values()))
    assert inside.returncode == 1 and "inside the repository, which is served to everyone" in inside.stderr


# systemd-analyze security: 0 (locked down) .. 10. Measured 1.2 (the coordinator's is 1.4).
MAX_APT_SOURCE_EXPOSURE = 1.5


def test_the_apt_source_unit_verifies_and_is_locked_down(tmp_path: Path) -> None:
    root = make_unit_root(tmp_path / "root", ["/usr/bin/python3"])
    code, output = verify(root, UNIT.name, UNIT.read_text())
    assert (code, output) == (0, [])
    assert exposure(root, UNIT) <= MAX_APT_SOURCE_EXPOSURE


def test_the_coordinator_package_ships_the_unit_disabled(debs: dict[str, Path], tmp_path: Path) -> None:
    run(["dpkg-deb", "--extract", str(debs[COORDINATOR]), str(tmp_path)], 60)
    assert (tmp_path / "lib/systemd/system" / UNIT.name).read_text() == UNIT.read_text()
    postinst = run(["dpkg-deb", "--info", str(debs[COORDINATOR]), "postinst"], 60).stdout
    # --no-enable: enabled again on upgrade only if the operator had enabled it (the booted
    # test below sees it installed disabled and inactive).
    enables = [line.strip() for line in postinst.splitlines() if "'picoord-apt.service'" in line]
    assert enables.count("deb-systemd-helper enable 'picoord-apt.service' >/dev/null || true") == 1
    previous = enables[
        enables.index("deb-systemd-helper enable 'picoord-apt.service' >/dev/null || true") - 1
    ]
    assert previous == "if deb-systemd-helper --quiet was-enabled 'picoord-apt.service'; then", enables


# ---------------------------------------------------------------------------------------
# A booted Debian node using it.


class HostServer:
    """picoord-apt.service's command, run on the host in the node's network namespace, so
    the node reaches it on its own loopback; `served` is a symlink switched between
    repositories (http.server resolves the directory at each request)."""

    def __init__(self, work: Path) -> None:
        self.served = work / "served"
        self.log = work / "http.log"
        self.process: subprocess.Popen[bytes] | None = None

    def serve(self, repo: Path) -> None:
        """Serve `repo` from now on, its indexes newer than any served before, as after a
        `make repo`: http.server answers apt's If-Modified-Since to the second, and the
        copies made here keep their source's times."""
        time.sleep(1.1)
        now = time.time()
        for path in (repo / "dists").rglob("*"):
            os.utime(path, (now, now))
        self.served.unlink(missing_ok=True)
        self.served.symlink_to(repo)

    def start(self, leader: int) -> None:
        exec_start = next(line for line in UNIT.read_text().splitlines() if line.startswith("ExecStart="))
        argv = exec_start.split("=", 1)[1].split()
        argv[argv.index("--directory") + 1] = str(self.served)
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                ["nsenter", f"--net=/proc/{leader}/ns/net", "--", *argv],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(10)
        self.process = None


@pytest.fixture(scope="module")
def node(
    tmp_path_factory: pytest.TempPathFactory, debs: dict[str, Path], upgrade_debs: dict[str, Path]
) -> Iterator[Container]:
    """One booted Debian 12 root for the module, Debian's package lists and the packages
    the two debs (and curl) need already downloaded: it has no network once booted."""
    require_root_or_fail()
    made = Container(tmp_path_factory.mktemp("node"), base_root())
    ours = [*debs.values(), *upgrade_debs.values()]
    try:
        made.prepare(list(debs.values()))
        apt = ["--pipe", "--setenv=DEBIAN_FRONTEND=noninteractive", "--", "apt-get"]
        run_apt(made.nspawn_argv(*apt, "install", "-y", "-q", "--download-only", "curl"), 600)
        shutil.rmtree(made.root / "root" / "debs")  # from the apt source only, here
        made.boot()
        made.apt("install", "-y", "-q", "--no-install-recommends", "curl")
        yield made
    finally:
        made.destroy()
        # apt keeps what it fetched from the source in the archive cache shared with the
        # other install tests: take back exactly our files.
        for deb in ours:
            cached = made.archives / deb.name
            if cached.is_file() and cached.read_bytes() == deb.read_bytes():
                cached.unlink()
        assert not os.path.ismount(made.root), f"{made.root} is still mounted"


@pytest.fixture(scope="module")
def key_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The archive key the node trusts, kept across the module as on the desktop."""
    return tmp_path_factory.mktemp("archive") / "key"


@pytest.fixture(scope="module")
def server(node: Container, tmp_path_factory: pytest.TempPathFactory) -> Iterator[HostServer]:
    made = HostServer(tmp_path_factory.mktemp("server"))
    try:
        yield made
    finally:
        made.stop()


def update(node: Container) -> subprocess.CompletedProcess[str]:
    """`apt update` for the picoord source alone: the node has no route to Debian's mirror,
    whose lists (fetched before boot) must stay, so the others are neither read nor cleaned."""
    return node.apt(
        "update", "-o", f"Dir::Etc::SourceList={SOURCES}", "-o", "Dir::Etc::SourceParts=/dev/null",
        "-o", "APT::Get::List-Cleanup=0", check=False, timeout=120,
    )  # fmt: skip


def installed_version(node: Container) -> str:
    return node.sh("dpkg-query", "-W", "-f=${Version}", AGENT, check=False).stdout


def test_a_node_installs_from_the_source_refuses_bad_ones_and_upgrades(
    node: Container,
    server: HostServer,
    debs: dict[str, Path],
    upgrade_debs: dict[str, Path],
    key_dir: Path,
    tmp_path: Path,
) -> None:
    first, second = tmp_path / "first", tmp_path / "second"
    made = make_repo(first, key_dir, list(debs.values()))
    assert made.returncode == 0, made.stderr
    shutil.copytree(first, second)
    assert make_repo(second, key_dir, list(upgrade_debs.values())).returncode == 0
    server.serve(first)
    server.start(node.leader)
    deadline = time.monotonic() + 30
    while node.sh("curl", "-fsS", "-o", "/dev/null", f"{URL}/dists/stable/InRelease", check=False).returncode:
        assert time.monotonic() < deadline, server.log.read_text()
        time.sleep(0.3)

    # The lines build-repo printed, as the operator runs them on the node.
    lines = [line.strip() for line in made.stdout.splitlines() if line.startswith("  ")]
    curl, check, source, install = lines
    node.sh("sh", "-c", curl)
    expected = check.split("# must print ")[1]
    assert node.sh("sh", "-c", check.split("#")[0]).stdout.split()[0] == expected
    node.sh("sh", "-c", source)
    assert install == "apt update && apt install picoord-agent"
    assert update(node).returncode == 0
    node.apt("install", "-y", "-q", AGENT, timeout=600)
    assert installed_version(node) == VERSION
    policy = node.sh("apt-cache", "policy", AGENT).stdout
    assert f"{URL} stable/main" in policy, policy
    status = node.file_digest("/var/lib/dpkg/status")

    # Refused: unsigned, changed after signing, signed by another key. Each time the update
    # fails, the newer version is never a candidate and nothing installed changes.
    unsigned = tmp_path / "unsigned"
    shutil.copytree(second, unsigned)
    for name in ("InRelease", "Release.gpg"):
        (unsigned / "dists/stable" / name).unlink()
    tampered = tmp_path / "tampered"
    shutil.copytree(second, tampered)
    for architecture in ("amd64", "arm64"):
        index = tampered / f"dists/stable/main/binary-{architecture}/Packages"
        text = index.read_text().replace(f"Version: {UPGRADE_VERSION}\n", "Version: 9.9.9\n")
        assert "Version: 9.9.9" in text
        index.write_text(text)
        index.with_name("Packages.gz").write_bytes(gzip.compress(text.encode()))
    other_key = tmp_path / "other-key-repo"
    assert make_repo(other_key, tmp_path / "other-key", list(upgrade_debs.values())).returncode == 0
    refusals = {
        "unsigned": (unsigned, ("is no longer signed",)),  # it was, at install
        # Not the bytes the signed Release names: its size, else its hash, differs.
        "tampered": (tampered, ("File has unexpected size", "Hash Sum mismatch")),
        # apt only warns here (exit 0): "The repository is not updated and the previous
        # index files will be used", which the candidate check below holds it to.
        "another key": (other_key, ("NO_PUBKEY",)),
    }
    for name, (repo, said) in refusals.items():
        server.serve(repo)
        refused = update(node)
        output = refused.stdout + refused.stderr
        assert any(words in output for words in said), f"{name}: {output}"
        assert refused.returncode != 0 or name == "another key", f"{name}: {output}"
        upgrade = node.apt("install", "-y", "-q", "--only-upgrade", AGENT, check=False)
        assert upgrade.returncode == 0, f"{name}: {upgrade.stdout}{upgrade.stderr}"
        candidate = node.sh("apt-cache", "policy", AGENT).stdout
        assert f"Candidate: {VERSION}\n" in candidate, f"{name}: {candidate}"
        assert installed_version(node) == VERSION, name
        assert node.file_digest("/var/lib/dpkg/status") == status, f"{name}: dpkg's status changed"

    # A newer build, signed: offered as an upgrade, and installed.
    server.serve(second)
    assert update(node).returncode == 0
    simulated = node.sh("apt-get", "-s", "upgrade").stdout
    assert f"Inst {AGENT} [{VERSION}] ({UPGRADE_VERSION} picoord:stable" in simulated, simulated
    node.apt("install", "-y", "-q", "--only-upgrade", AGENT, timeout=600)
    assert installed_version(node) == UPGRADE_VERSION


def test_the_coordinator_package_serves_the_source_itself(
    node: Container, server: HostServer, debs: dict[str, Path], upgrade_debs: dict[str, Path], key_dir: Path
) -> None:
    """The desktop's way: picoord-coordinator from the same source, `make repo` into
    /var/lib/picoord-apt, `systemctl enable --now picoord-apt`; the node reads it from there."""
    assert installed_version(node) == UPGRADE_VERSION, "runs after the install test, on its node"
    node.apt("install", "-y", "-q", COORDINATOR, timeout=600)  # still from the host's server
    server.stop()  # the node's port 8470 is picoord-apt.service's from here on
    assert node.sh("systemctl", "is-enabled", "picoord-apt", check=False).stdout.strip() == "disabled"
    assert node.sh("systemctl", "is-active", "picoord-apt", check=False).stdout.strip() == "inactive"
    served = node.root / build_repo.DEFAULT_REPO.relative_to("/")
    refused = make_repo(served, key_dir, [])  # nothing to add: refused, nothing made
    assert refused.returncode == 1 and "no .deb given" in refused.stderr and not served.exists()
    made = make_repo(served, key_dir, [*debs.values(), *upgrade_debs.values()])
    assert made.returncode == 0, made.stderr
    node.systemctl("enable", "picoord-apt")
    node.systemctl("start", "picoord-apt")
    deadline = time.monotonic() + 30
    while node.sh("curl", "-fsS", "-o", "/dev/null", f"{URL}/dists/stable/InRelease", check=False).returncode:
        assert time.monotonic() < deadline, node.journal("picoord-apt")
        time.sleep(0.3)
    fetched = node.sh("sh", "-c", f"curl -fsS {URL}/picoord.gpg | sha256sum").stdout.split()[0]
    assert fetched == hashlib.sha256((served / "picoord.gpg").read_bytes()).hexdigest()
    assert fetched == node.file_digest(KEYRING), "the same key the node already trusts"
    assert update(node).returncode == 0, node.journal("picoord-apt")
    assert f"{URL} stable/main" in node.sh("apt-cache", "policy", AGENT).stdout
    assert node.show("picoord-apt", "DynamicUser") == "yes"
    assert node.show("picoord-apt", "NRestarts") == "0"
    node.systemctl("stop", "picoord-apt")
