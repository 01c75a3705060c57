"""Lab Pis with their own filesystem state and real services: dockerd and glusterd per Pi.

Why: the node actions (firewall, mounts, swarm, gluster) change files and daemons whose
state lives at fixed paths. These tests prove a sandboxed lab Pi is a credible stand-in: its
/etc/ufw, /etc/fstab, /srv... are its own, its dockerd and glusterd are its own and can
form a real Swarm and a real replicated Gluster volume with the other Pis, and destroying it
leaves nothing behind on the host.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from picoord.lab import netns
from picoord.lab import sandbox as sandbox_module
from picoord.lab.cluster import Lab, sweep_orphans
from picoord.lab.netns import LabNetwork
from picoord.lab.sandbox import PiRack, PiSandbox, host_mount_points

pytestmark = pytest.mark.lab

DOCKER = ["docker", "-H", "unix:///run/docker/docker.sock"]
GLUSTER = ["gluster", "--mode=script"]


def ns_id(path: str | Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except (FileNotFoundError, ProcessLookupError, PermissionError):  # PID 1 may be off limits
        return None
    return (st.st_dev, st.st_ino)


def pids_in_mount_namespace(ns: tuple[int, int]) -> list[int]:
    found = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit() and ns_id(f"/proc/{entry.name}/ns/mnt") == ns:
            found.append(int(entry.name))
    return found


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rpartition(")")[2].split()[0] not in ("Z", "X")


def references_to(ns_inode: int) -> list[str]:
    """Every process's mountinfo line that still mounts that mount namespace's file."""
    needle = f"mnt:[{ns_inode}]"
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            text = Path(f"/proc/{entry.name}/mountinfo").read_text()
        except OSError:  # gone, exiting, or off limits
            continue
        found += [f"{entry.name}: {line}" for line in text.splitlines() if needle in line]
    return found


def foreign_lab_mount(point: str, sb: PiSandbox) -> bool:
    """A host mount another lab made: its namespace files or its sandboxes' namespace dirs."""
    if point.startswith("/run/netns/pcl"):
        return not point.endswith(f"/{sb.netns}")
    return f"/{sandbox_module.NS_DIR}" in point and not point.startswith(f"{sb.root}/")


def ok(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode == 0, f"{done.args[-6:]} exited {done.returncode}: {done.stderr or done.stdout}"
    return done.stdout


def eventually(check: Callable[[], object], timeout: float, what: str) -> object:
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(0.5)
    raise AssertionError(f"not {what} within {timeout:g}s (last: {last!r})")


@pytest.fixture(scope="module")
def rack(module_sandbox_factory: Callable[..., PiRack]) -> PiRack:
    """Three sandboxed Pis, each with dockerd and glusterd, shared by this module."""
    return module_sandbox_factory(3, services=("dockerd", "glusterd"))


# --------------------------------------------------------------------------- private paths


@pytest.mark.parametrize("path", ["/etc/ufw/picoord-test.rules", "/srv/picoord-test", "/mnt/picoord-test"])
def test_a_file_written_in_a_private_dir_stays_in_that_pi(rack: PiRack, path: str) -> None:
    pi1, pi2 = rack.sandbox("pi1"), rack.sandbox("pi2")
    assert not Path(path).exists(), f"{path} exists on the host before the test"
    try:
        ok(pi1.run(["python3", "-c", "import sys; open(sys.argv[1], 'w').write('pi1')", path]))
        assert ok(pi1.run(["cat", path])) == "pi1"
        assert not Path(path).exists(), "the host sees the file pi1 wrote"
        assert pi2.run(["cat", path]).returncode != 0, "pi2 sees the file pi1 wrote"
        assert pi1.host_path(path).read_text() == "pi1"  # where it really lives
    finally:
        pi1.run(["rm", "-f", path])


def test_fstab_is_a_private_copy_of_the_hosts(rack: PiRack) -> None:
    pi1, pi2 = rack.sandbox("pi1"), rack.sandbox("pi2")
    host = Path("/etc/fstab").read_text()
    assert ok(pi1.run(["cat", "/etc/fstab"])) == host  # seeded, like a fresh Pi
    line = "pi1:/gv0 /mnt/gv0 glusterfs defaults,_netdev 0 0\n"
    try:
        ok(pi1.run(["python3", "-c", f"open('/etc/fstab', 'a').write({line!r})"]))
        assert line in ok(pi1.run(["cat", "/etc/fstab"]))
        assert Path("/etc/fstab").read_text() == host
        assert ok(pi2.run(["cat", "/etc/fstab"])) == host
    finally:
        pi1.host_path("/etc/fstab").write_text(host)


def test_ufw_config_is_seeded_from_the_host(rack: PiRack) -> None:
    listing = ok(rack.sandbox("pi1").run(["ls", "/etc/ufw"])).split()
    assert sorted(listing) == sorted(p.name for p in Path("/etc/ufw").iterdir())
    assert "ufw.conf" in listing


def test_ufw_default_policy_file_is_private(rack: PiRack) -> None:
    """`ufw default allow incoming` rewrites /etc/default/ufw: it must be the Pi's own."""
    pi1, pi2 = rack.sandbox("pi1"), rack.sandbox("pi2")
    host = Path("/etc/default/ufw").read_text()
    assert ok(pi1.run(["cat", "/etc/default/ufw"])) == host
    try:
        ok(pi1.run(["ufw", "default", "allow", "incoming"]))
        assert 'DEFAULT_INPUT_POLICY="ACCEPT"' in ok(pi1.run(["cat", "/etc/default/ufw"]))
        assert Path("/etc/default/ufw").read_text() == host
        assert ok(pi2.run(["cat", "/etc/default/ufw"])) == host
    finally:
        pi1.host_path("/etc/default/ufw").write_text(host)


def test_shared_paths_hostname_and_sysfs(rack: PiRack, tmp_path: Path) -> None:
    pi1 = rack.sandbox("pi1")
    (tmp_path / "from-host").write_text("shared")
    assert ok(pi1.run(["cat", str(tmp_path / "from-host")])) == "shared"  # /tmp is the host's
    assert pi1.netns in ok(pi1.run(["ip", "netns", "list"]))  # /run/netns stays visible
    assert ok(pi1.run(["hostname"])).strip() == "pi1"
    assert ok(pi1.run(["cat", "/proc/sys/kernel/hostname"])).strip() == "pi1"
    assert sorted(ok(pi1.run(["ls", "/sys/class/net"])).split())[:2] == ["docker0", "eth0"]
    assert "cpu" in ok(pi1.run(["ls", "/sys/fs/cgroup"])).split()
    assert f"inet {rack.address('pi1')}/" in ok(pi1.run(["ip", "-4", "addr", "show", "eth0"]))


def test_a_namespace_added_on_the_host_later_is_visible_inside(rack: PiRack) -> None:
    name = f"pclsbx{os.getpid() % 10000}"
    subprocess.run(["ip", "netns", "add", name], check=True, timeout=10)
    try:
        assert name in ok(rack.sandbox("pi1").run(["ip", "netns", "list"]))
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False, timeout=10)
    assert name not in ok(rack.sandbox("pi1").run(["ip", "netns", "list"]))


def test_mounts_made_inside_do_not_reach_the_host(rack: PiRack) -> None:
    before = host_mount_points()
    pi1 = rack.sandbox("pi1")
    ok(pi1.run(["mkdir", "-p", "/mnt/tmpfs-test"]))
    try:
        ok(pi1.run(["mount", "-t", "tmpfs", "tmpfs", "/mnt/tmpfs-test"]))
        assert "/mnt/tmpfs-test" in pi1.mounts()
        assert "/mnt/tmpfs-test" not in rack.sandbox("pi2").mounts()
        added = [p for p in host_mount_points() if p not in before]
        assert all(foreign_lab_mount(p, pi1) for p in added), added  # tests running alongside
        assert "/mnt/tmpfs-test" not in host_mount_points()
    finally:
        pi1.run(["umount", "/mnt/tmpfs-test"])
        pi1.run(["rmdir", "/mnt/tmpfs-test"])


# --------------------------------------------------------------------------- dockerd and swarm


def test_each_pi_has_its_own_dockerd(rack: PiRack) -> None:
    infos = {}
    for node in ("pi1", "pi2"):
        infos[node] = json.loads(ok(rack.sandbox(node).run([*DOCKER, "info", "--format", "{{json .}}"])))
    assert infos["pi1"]["ID"] != infos["pi2"]["ID"]
    assert infos["pi1"]["Name"] == "pi1" and infos["pi2"]["Name"] == "pi2"
    assert infos["pi1"]["DockerRootDir"] == "/var/lib/docker"
    # The socket is the Pi's own: from the host it lives under the sandbox root.
    host_socket = rack.sandbox("pi1").host_path(PiSandbox.docker_socket)
    assert host_socket.is_socket()
    assert not Path(PiSandbox.docker_socket).is_socket()


def test_dockerd_leaves_the_hosts_forward_chain_alone(rack: PiRack) -> None:
    """dockerd's FORWARD DROP policy and DOCKER chains land in the Pi's namespace only."""
    inside = ok(rack.sandbox("pi1").run(["iptables", "-S"]))
    assert "-N DOCKER" in inside
    host = subprocess.run(["iptables", "-S"], capture_output=True, text=True, timeout=10, check=True).stdout
    assert "-N DOCKER" not in host or Path("/run/docker.pid").exists()  # unless a host dockerd runs
    assert "-P FORWARD ACCEPT" in host


def test_a_real_swarm_forms_between_two_pis(rack: PiRack) -> None:
    pi1, pi2 = rack.sandbox("pi1"), rack.sandbox("pi2")
    address = rack.address("pi1")
    try:
        ok(pi1.run([*DOCKER, "swarm", "init", "--advertise-addr", address], timeout=60))
        token = ok(pi1.run([*DOCKER, "swarm", "join-token", "-q", "worker"])).strip()
        ok(
            pi2.run(
                [
                    *DOCKER,
                    "swarm",
                    "join",
                    "--advertise-addr",
                    rack.address("pi2"),
                    "--token",
                    token,
                    address,
                ],
                timeout=60,
            )
        )

        def both_ready() -> object:
            out = ok(pi1.run([*DOCKER, "node", "ls", "--format", "{{.Hostname}} {{.Status}}"]))
            nodes = dict(line.split() for line in out.splitlines())
            return nodes if nodes == {"pi1": "Ready", "pi2": "Ready"} else None

        eventually(both_ready, 30, "both nodes Ready in `docker node ls`")
        managers = ok(pi1.run([*DOCKER, "node", "ls", "--filter", "role=manager", "-q"])).split()
        assert len(managers) == 1
    finally:
        pi2.run([*DOCKER, "swarm", "leave", "--force"], timeout=60)
        pi1.run([*DOCKER, "swarm", "leave", "--force"], timeout=60)
    assert "inactive" in ok(pi1.run([*DOCKER, "info", "--format", "{{.Swarm.LocalNodeState}}"]))


def test_the_docker_cli_default_socket_leads_to_the_pis_own_dockerd(rack: PiRack) -> None:
    for node in ("pi1", "pi2"):
        sb = rack.sandbox(node)
        assert ok(sb.run(["docker", "info", "--format", "{{.Name}}"])).strip() == node
        assert sandbox_module.socket_bound(sb, "/run/docker.sock")
    assert not Path("/run/docker.sock").is_socket() or Path("/run/docker.pid").exists()


# --------------------------------------------------------------------------- glusterd


def test_each_pi_has_its_own_glusterd(rack: PiRack) -> None:
    pis = [rack.sandbox(node) for node in ("pi1", "pi2", "pi3")]
    uuids = {ok(sb.run([*GLUSTER, "system::", "uuid", "get"])) for sb in pis}
    assert len(uuids) == 3, "the Pis share a glusterd UUID"
    for sb in pis:
        # the CLI's fixed socket path is, inside each Pi, that Pi's own glusterd socket
        assert sandbox_module.socket_bound(sb, PiSandbox.glusterd_socket)
        assert sb.host_path("/run/gluster/glusterd.socket").is_socket()
        listening = ok(sb.run(["ss", "-ltnH", "sport", "= :24007"]))
        assert "24007" in listening


def test_a_replica_3_gluster_volume_across_three_pis(rack: PiRack) -> None:
    pis = [rack.sandbox(node) for node in ("pi1", "pi2", "pi3")]
    pi1 = pis[0]
    volume = "gvtest"
    mounted: list[PiSandbox] = []
    try:
        for node in ("pi2", "pi3"):
            ok(pi1.run([*GLUSTER, "peer", "probe", rack.address(node)], timeout=60))

        def peers_connected() -> object:
            out = ok(pi1.run([*GLUSTER, "peer", "status"]))
            return out.count("(Connected)") == 2

        eventually(peers_connected, 60, "two peers connected")
        bricks = [f"{rack.address(sb.name)}:/srv/bricks/{volume}" for sb in pis]
        for sb in pis:
            ok(sb.run(["mkdir", "-p", "/srv/bricks"]))
        ok(
            pi1.run(
                [*GLUSTER, "volume", "create", volume, "replica", "3", *bricks, "force"],
                timeout=120,
            )
        )
        ok(pi1.run([*GLUSTER, "volume", "start", volume], timeout=120))
        for sb in pis[:2]:
            ok(sb.run(["mkdir", "-p", f"/mnt/{volume}"]))
            ok(
                sb.run(
                    ["mount", "-t", "glusterfs", f"{rack.address(sb.name)}:/{volume}", f"/mnt/{volume}"],
                    timeout=60,
                )
            )
            mounted.append(sb)
            assert f"/mnt/{volume}" in sb.mounts()
        assert not any(p.startswith(f"/mnt/{volume}") for p in host_mount_points())
        ok(pis[0].run(["python3", "-c", f"open('/mnt/{volume}/hello', 'w').write('from pi1')"]))
        assert ok(pis[1].run(["cat", f"/mnt/{volume}/hello"])) == "from pi1"
        # replicated: every brick holds the file, pi3's too (which has no mount)
        for sb in pis:
            assert sb.host_path(f"/srv/bricks/{volume}/hello").read_text() == "from pi1"
    finally:
        for sb in mounted:
            sb.run(["umount", f"/mnt/{volume}"], timeout=30)
        pi1.run([*GLUSTER, "volume", "stop", volume, "force"], timeout=120)
        pi1.run([*GLUSTER, "volume", "delete", volume], timeout=120)
        for node in ("pi2", "pi3"):
            pi1.run([*GLUSTER, "peer", "detach", rack.address(node), "force"], timeout=60)


# --------------------------------------------------------------------------- destroy


def sleep_image_tar(path: Path) -> Path:
    """A minimal root filesystem holding /bin/sleep and the libraries it needs."""
    ldd = subprocess.run(["ldd", "/bin/sleep"], capture_output=True, text=True, check=True, timeout=10)
    files = ["/bin/sleep", *re.findall(r"(/\S+) \(0x", ldd.stdout)]
    with tarfile.open(path, "w") as tar:
        for file in files:
            real = os.path.realpath(file)
            tar.add(real, arcname=file.lstrip("/"))
    return path


def test_destroy_leaves_no_mount_process_or_namespace(
    sandbox_factory: Callable[..., PiRack], tmp_path: Path
) -> None:
    host_before = host_mount_points()
    rack = sandbox_factory(1, services=("dockerd", "glusterd"))
    sb = rack.sandbox("pi1")
    address = rack.address("pi1")
    ours = {p for p in host_mount_points() if p not in host_before and not foreign_lab_mount(p, sb)}
    assert ours == {f"/run/netns/{sb.netns}", str(sb.ns_dir), str(sb.uts_ns), str(sb.mnt_ns)}
    # A running container, a brick process and a FUSE mount: the hardest things to clean.
    tar = sleep_image_tar(tmp_path / "sleep.tar")
    ok(sb.run([*DOCKER, "import", str(tar), "lab/sleep:1"], timeout=60))
    ok(sb.run([*DOCKER, "run", "-d", "--network", "none", "lab/sleep:1", "/bin/sleep", "1000"], timeout=60))
    ok(sb.run(["mkdir", "-p", "/srv/bricks", "/mnt/gv1"]))
    ok(sb.run([*GLUSTER, "volume", "create", "gv1", f"{address}:/srv/bricks/gv1", "force"], timeout=60))
    ok(sb.run([*GLUSTER, "volume", "start", "gv1"], timeout=60))
    ok(sb.run(["mount", "-t", "glusterfs", f"{address}:/gv1", "/mnt/gv1"], timeout=60))
    assert "/mnt/gv1" in sb.mounts()

    mnt = ns_id(sb.mnt_ns)
    assert mnt is not None
    inside = pids_in_mount_namespace(mnt)
    everything = sandbox_module.with_descendants(inside)
    names = {Path(f"/proc/{pid}/comm").read_text().strip() for pid in everything if alive(pid)}
    assert {"dockerd", "containerd", "glusterd", "glusterfsd", "glusterfs", "sleep"} <= names, names

    sb.destroy()  # directly, as `picoord-lab down` from another process would: no handles

    assert [pid for pid in everything if alive(pid)] == []
    assert pids_in_mount_namespace(mnt) == []
    assert references_to(mnt[1]) == []
    assert not sb.exists()
    assert not sb.ns_dir.exists()
    # Only other labs (tests running alongside) may have added host mounts meanwhile: the
    # lab's namespace files and sandbox namespace dirs; nothing of ours, nothing dockerd or
    # gluster made (overlays, netns files, FUSE).
    added = [p for p in host_mount_points() if p not in host_before]
    assert [p for p in added if not foreign_lab_mount(p, sb)] == [f"/run/netns/{sb.netns}"]
    sb.destroy()  # idempotent


def test_create_refuses_a_missing_network_namespace(root: None, tmp_path: Path) -> None:
    sb = PiSandbox(name="pi1", netns="pcl0000-pi9", root=tmp_path)
    with pytest.raises(netns.LabError, match="does not exist"):
        sb.create()
    assert not sb.exists()


def test_argv_refuses_shell_strings(tmp_path: Path) -> None:
    sb = PiSandbox(name="pi1", netns="pclabcd-pi1", root=tmp_path)
    with pytest.raises(TypeError):
        sb.argv("ls /")  # type: ignore[arg-type]
    assert sb.argv(["true"])[-2:] == ["--", "true"]
    assert sb.host_path("/run/docker/docker.sock") == tmp_path / "fs/run/docker/docker.sock"
    assert sb.host_path("/etc/fstab") == tmp_path / "fs/etc/fstab"
    assert sb.host_path("/run/netns") == Path("/run/netns")
    assert sb.host_path("/srvx") == Path("/srvx")


# --------------------------------------------------------------------------- Lab integration


def test_lab_runs_agents_inside_sandboxes_and_down_works_from_another_process(
    lab_factory: Callable[..., Lab],
) -> None:
    lab = lab_factory(2, sandboxes=True, services=("dockerd",))
    host_before_down = host_mount_points()
    sandboxes = {node: lab.sandbox(node) for node in lab.nodes}
    for node, sb in sandboxes.items():
        assert sb.exists()
        agent = lab.processes[node].pid
        assert ns_id(f"/proc/{agent}/ns/mnt") == ns_id(sb.mnt_ns), (
            f"the agent of {node} is not in its sandbox"
        )
        assert ok(lab.exec_in(node, "hostname")).strip() == node
        assert ok(sb.run([*DOCKER, "info", "--format", "{{.Name}}"])).strip() == node
    assert lab.describe()["sandboxes"]["sandboxes"]["pi1"]["netns"] == lab.namespace("pi1")
    everything = set()
    for sb in sandboxes.values():
        everything |= sandbox_module.with_descendants(sb.pids())
    assert everything

    done = subprocess.run(
        [str(Path(sys.executable).parent / "picoord-lab"), "down", "--work-dir", str(lab.work_dir)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert [pid for pid in everything if alive(pid)] == []
    assert not any(sb.exists() for sb in sandboxes.values())
    assert not any(p.startswith(f"{lab.work_dir}/") for p in host_mount_points())
    assert not any(p.startswith(f"/run/netns/pcl{lab.lab_id}-") for p in host_mount_points())
    # whatever else appeared meanwhile belongs to labs of tests running alongside
    added = [p for p in host_mount_points() if p not in host_before_down]
    assert all(foreign_lab_mount(p, sandboxes["pi1"]) for p in added), added


def test_down_all_sweeps_the_sandboxes_of_a_crashed_lab(
    network_factory: Callable[..., LabNetwork], tmp_path: Path
) -> None:
    """A lab whose state file is lost still leaves its sandboxes findable on the host."""
    net = network_factory(1)
    sb = PiSandbox(name="pi1", netns=net.pis[0].netns, root=tmp_path / "pi1")
    try:
        sb.create()
        sleeper = sb.popen(["sleep", "1000"], tmp_path / "sleep.log")
        # nsenter enters the namespaces a moment after the fork
        eventually(lambda: sb.pids() == [sleeper.pid], 5, "the sleeper inside the sandbox")
        found = [s for s in sandbox_module.find_sandboxes() if s.root == sb.root]
        assert [(s.name, s.netns) for s in found] == [("pi1", sb.netns)]

        swept = sweep_orphans([net.lab_id])

        assert f"sandbox pi1 ({sb.root})" in swept and sb.netns in swept
        assert sleeper.wait(timeout=10) is not None
        assert not sb.exists()
        assert netns.remaining(net) == []
    finally:
        sb.destroy()


def test_a_sandbox_whose_marker_is_gone_is_still_found_and_destroyed(
    network_factory: Callable[..., LabNetwork], tmp_path: Path
) -> None:
    net = network_factory(1)
    sb = PiSandbox(name="pi1", netns=net.pis[0].netns, root=tmp_path / "pi1")
    try:
        sb.create()
        (sb.root / sandbox_module.MARKER).unlink()
        found = [s for s in sandbox_module.find_sandboxes(tmp_path) if s.root == sb.root]
        assert [(s.name, s.netns) for s in found] == [("pi1", "")]
        found[0].destroy()
        assert not sb.exists()
    finally:
        sb.destroy()


def test_lab_refuses_unknown_services_and_services_without_sandboxes(tmp_path: Path) -> None:
    with pytest.raises(netns.LabError, match="unknown lab service"):
        Lab(tmp_path, lab_id="abcd", sandboxes=True, services=("sshd",))
    with pytest.raises(netns.LabError, match="sandboxes=True"):
        Lab(tmp_path, lab_id="abcd", services=("dockerd",))
    lab = Lab(tmp_path, lab_id="abcd", sandboxes=True, services=("dockerd", "glusterd"))
    with pytest.raises(netns.LabError, match="no sandboxes"):
        Lab(tmp_path, lab_id="abce").sandbox("pi1")
    assert lab.config.services == ["dockerd", "glusterd"]
