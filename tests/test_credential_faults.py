"""A full or read-only state dir during a certificate renewal: the old key and certificate
stay, whole, and nothing half-written is left beside them; the agent and the coordinator go
on with them. Real filesystems (a small tmpfs, then remounted read-only; an immutable
directory), so these need root."""

from __future__ import annotations

import datetime as dt
import errno
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from picoord.agent.enroll import new_key_and_csr
from picoord.agent.state import AgentFiles, Enrollment
from picoord.coordinator.ca import ClusterCA, certificate_pem


def run(*argv: str) -> None:
    subprocess.run(argv, check=True, timeout=30, capture_output=True)


@pytest.fixture
def small_state_dir(root: None, tmp_path: Path) -> Iterator[Path]:
    mountpoint = tmp_path / "state"
    mountpoint.mkdir()
    run("mount", "-t", "tmpfs", "-o", "size=64k,mode=0700", "tmpfs", str(mountpoint))
    try:
        yield mountpoint
    finally:
        run("umount", "--lazy", str(mountpoint))


def issue(ca: ClusterCA) -> tuple[bytes, bytes]:
    key_pem, csr_pem = new_key_and_csr("pi1")
    return key_pem, certificate_pem(ca.sign_node_csr(csr_pem, "pi1"))


def fill(directory: Path) -> None:
    fd = os.open(directory / "filler", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError as error:
        assert error.errno == errno.ENOSPC
    finally:
        os.close(fd)


@pytest.mark.parametrize("fault", ["full", "read-only"])
def test_a_renewal_that_cannot_be_written_keeps_the_old_pair(
    small_state_dir: Path, tmp_path: Path, fault: str
) -> None:
    ca = ClusterCA.load_or_create(tmp_path / "ca", node_validity=dt.timedelta(hours=1))
    files = AgentFiles(small_state_dir)
    files.save(Enrollment("pi1", "10.0.0.1:7443", 1.0), *issue(ca), ca.certificate_pem)
    before = files.credentials()
    listing = sorted(p.name for p in small_state_dir.iterdir())
    if fault == "full":
        fill(small_state_dir)
        listing.append("filler")
    else:
        run("mount", "-o", "remount,ro", str(small_state_dir))
    with pytest.raises(OSError) as raised:
        files.save_credentials(*issue(ca))
    assert raised.value.errno == (errno.ENOSPC if fault == "full" else errno.EROFS)
    assert files.credentials() == before
    assert sorted(p.name for p in small_state_dir.iterdir()) == sorted(listing)  # no .new, no .tmp


def test_a_coordinator_whose_state_dir_cannot_be_written_serves_its_current_certificate(
    root: None, tmp_path: Path
) -> None:
    first = ClusterCA.load_or_create(tmp_path).server
    assert first is not None
    subprocess.run(["chattr", "+i", str(tmp_path)], check=True, timeout=10)
    try:
        # a new advertised name makes the server certificate due for renewal at this start
        again = ClusterCA.load_or_create(tmp_path, ["pi-desktop.example"])
        assert again.server == first
        with pytest.raises(OSError):
            again.renew_server_if_due()
        assert again.server == first and again.server_generation == 0
    finally:
        subprocess.run(["chattr", "-i", str(tmp_path)], check=True, timeout=10)
    assert ClusterCA.load_or_create(tmp_path, ["pi-desktop.example"]).server != first  # heals
