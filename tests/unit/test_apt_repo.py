"""packaging/apt/build-repo's pure parts: which files it takes, what the nodes are told."""

from __future__ import annotations

import importlib.machinery
import importlib.util
from pathlib import Path

import pytest

BUILD_REPO = Path(__file__).resolve().parents[2] / "packaging" / "apt" / "build-repo"
UNIT = Path(__file__).resolve().parents[2] / "systemd" / "picoord-apt.service"


def load_build_repo():
    loader = importlib.machinery.SourceFileLoader("build_repo", str(BUILD_REPO))
    module = importlib.util.module_from_spec(importlib.util.spec_from_loader(loader.name, loader))
    loader.exec_module(module)
    return module


repo = load_build_repo()


@pytest.mark.parametrize(
    ("name", "error"),
    [
        ("picoord-agent_0.1.0_all.deb", None),
        ("picoord-coordinator_0.1.0+test1_all.deb", None),
        ("picoord-agent_0.2.0~rc1-1_all.deb", None),
        ("picoord-agent_0.1.0_arm64.deb", "not a NAME_VERSION_all.deb"),
        ("picoord-agent_1:0.1.0_all.deb", "not a NAME_VERSION_all.deb"),
        ("picoord-agent.deb", "not a NAME_VERSION_all.deb"),
        ("docker.io_20.10_all.deb", "'docker.io' is not one of picoord-agent, picoord-coordinator"),
        ("../picoord-agent_0.1.0_all.deb", None),  # only the file name goes into the pool
    ],
)
def test_pool_takes_only_picoords_packages(name: str, error: str | None) -> None:
    if error is None:
        assert repo.pool_name(Path("/build/deb") / name) == Path(name).name
    else:
        with pytest.raises(repo.RepoError, match=error):
            repo.pool_name(Path(name))


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("http://desktop:8470", "http://desktop:8470"),
        ("http://192.168.1.10:8470/", "http://192.168.1.10:8470"),
        ("http://desktop.lan", "http://desktop.lan"),
        ("https://desktop:8470", None),  # plain http: nodes need no CA to fetch it
        ("http://desktop:8470/debian", None),
        ("http://desktop:8470; rm -rf /", None),
        ("desktop:8470", None),
        ("", None),
    ],
)
def test_checked_url(url: str, expected: str | None) -> None:
    if expected is None:
        with pytest.raises(repo.RepoError, match=r"--url .* must look like http://HOST:PORT"):
            repo.checked_url(url)
    else:
        assert repo.checked_url(url) == expected


def test_node_setup_lines_name_the_key_its_digest_and_the_source() -> None:
    lines = repo.node_setup_lines("http://192.168.1.10:8470/", "ab" * 32)
    keyring = "/usr/share/keyrings/picoord-archive-keyring.gpg"
    assert lines == [
        f"curl -fsSL http://192.168.1.10:8470/picoord.gpg -o {keyring}",
        f"sha256sum {keyring}   # must print {'ab' * 32}",
        f'echo "deb [signed-by={keyring}] http://192.168.1.10:8470/ stable main"'
        " > /etc/apt/sources.list.d/picoord.list",
        "apt update && apt install picoord-agent",
    ]


def test_release_describes_one_suite_for_both_architectures() -> None:
    options = repo.release_options()
    fields = dict(option.removeprefix("APT::FTPArchive::Release::").split("=", 1) for option in options[1::2])
    assert set(options[0::2]) == {"-o"}
    assert fields["Suite"] == fields["Codename"] == "stable"
    assert fields["Components"] == "main"
    assert fields["Architectures"] == "amd64 arm64"
    assert repo.index_dirs() == ["dists/stable/main/binary-amd64", "dists/stable/main/binary-arm64"]


@pytest.mark.parametrize(
    ("listing", "expected"),
    [
        (
            "sec:u:255:22:D5C0267B84E740F4:1796601298:::u:::scESC:::+:::ed25519:::0:\n"
            "fpr:::::::::166D33EAD46DB4B52F3772F2D5C0267B84E740F4:\n"
            "grp:::::::::AAAA:\n",
            "166D33EAD46DB4B52F3772F2D5C0267B84E740F4",
        ),
        ("sec:u:255:22:D5C0267B84E740F4:::\n", None),
        ("fpr:::::::::not-hex:\n", None),
    ],
)
def test_fingerprint_from_colons(listing: str, expected: str | None) -> None:
    if expected is None:
        with pytest.raises(repo.RepoError, match="no fingerprint"):
            repo.fingerprint_from_colons(listing)
    else:
        assert repo.fingerprint_from_colons(listing) == expected


def test_add_to_pool_refuses_a_rebuild_under_the_same_version_and_copies_nothing(tmp_path: Path) -> None:
    pool, built = tmp_path / "pool", tmp_path / "built"
    pool.mkdir()
    built.mkdir()
    agent = built / "picoord-agent_0.1.0_all.deb"
    coordinator = built / "picoord-coordinator_0.1.0_all.deb"
    agent.write_bytes(b"agent")
    coordinator.write_bytes(b"coordinator")
    assert repo.add_to_pool(pool, [agent, coordinator]) == [agent.name, coordinator.name]
    assert repo.add_to_pool(pool, [agent, coordinator]) == []  # the same bytes again: nothing to do
    newer = built / "picoord-agent_0.1.1_all.deb"
    newer.write_bytes(b"agent, newer")
    agent.write_bytes(b"agent, rebuilt")
    rebuilt = r"already holds picoord-agent_0\.1\.0_all\.deb with other contents"
    with pytest.raises(repo.RepoError, match=rebuilt):
        repo.add_to_pool(pool, [newer, agent])
    assert sorted(path.name for path in pool.iterdir()) == [agent.name, coordinator.name]
    assert (pool / agent.name).read_bytes() == b"agent"


def test_the_unit_serves_the_default_repository_on_the_documented_port() -> None:
    exec_start = next(line for line in UNIT.read_text().splitlines() if line.startswith("ExecStart="))
    assert exec_start.split("=", 1)[1].split() == [
        "/usr/bin/python3", "-I", "-m", "http.server", "--directory", str(repo.DEFAULT_REPO), str(repo.PORT),
    ]  # fmt: skip


def test_docs_give_the_lines_build_repo_prints() -> None:
    docs = (Path(__file__).resolve().parents[2] / "docs" / "install.md").read_text()
    curl, check, source, install = repo.node_setup_lines(f"http://DESKTOP:{repo.PORT}", "0" * 64)
    for line in (curl, source, install):
        assert f"    {line}\n" in docs, line
    assert check.split("#")[0] in docs
    assert str(repo.DEFAULT_KEY_DIR) in docs and str(repo.DEFAULT_REPO) in docs
