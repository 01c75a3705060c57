"""Which paths a mount may use (common/validation.py mount_path_refusal): a floor that
holds everywhere, and the node's layer with its allow_mount_paths and its own state dir."""

from __future__ import annotations

import pytest

from picoord.common.checks.storage import mount_spec
from picoord.common.validation import FieldError, bind_source, mount_path_refusal, mount_target
from picoord.v1 import actions_pb2

STATE = ("/var/lib/picoord/agent",)


@pytest.mark.parametrize(
    ("path", "node", "allowed", "refusal"),
    [
        # the floor: everywhere, whatever the node allows
        ("/", False, (), ("over", "/")),
        ("/", True, ("/",), ("over", "/")),
        ("/proc", False, (), ("over", "/proc")),
        ("/proc/sys/kernel", False, (), ("under", "/proc")),
        ("/sys/fs/cgroup", True, ("/sys/fs/cgroup",), ("under", "/sys")),
        ("/dev/shm", False, (), ("under", "/dev")),
        ("/etc", False, (), ("over", "/etc")),
        ("/usr", False, (), ("over", "/usr")),
        ("/var", False, (), ("over", "/var")),  # would hide /var/lib/docker and the rest
        ("/var/lib", True, ("/var/lib",), ("over", "/var/lib")),
        ("/var/lib/docker", False, (), ("over", "/var/lib/docker")),
        ("/run", False, (), ("over", "/run")),
        # under a system tree: the coordinator lets it through (it cannot know the node's
        # config), the node refuses unless allowed
        ("/etc/ufw", False, (), None),
        ("/etc/ufw", True, (), ("under", "/etc")),
        ("/etc/ufw/applications.d", True, ("/etc/ufw",), None),
        ("/boot/firmware", True, (), ("under", "/boot")),
        ("/lib64/x", True, (), ("under", "/lib64")),
        ("/run/picoord/x", True, (), ("under", "/run")),
        ("/run/media/usb", True, ("/run/media",), None),
        ("/var/lib/picoord/x", True, (), ("under", "/var/lib/picoord")),
        ("/var/lib/glusterd/vols", True, (), ("under", "/var/lib/glusterd")),
        ("/var/lib/docker/volumes/data", True, (), ("under", "/var/lib/docker")),
        ("/var/lib/docker/volumes/data", True, ("/var/lib/docker/volumes/data",), None),
        ("/var/lib/docker/volumes", True, ("/var/lib/docker/volumes/data",), ("under", "/var/lib/docker")),
        # ordinary places
        ("/mnt/mcp-storage", True, (), None),
        ("/srv/mcp-storage", True, (), None),
        ("/data/gluster", True, (), None),
        ("/etcetera", True, (), None),  # whole components: not under /etc
        ("/var/lib/picoord-data", True, (), None),
        ("/home/pi/media", True, (), None),
    ],
)
def test_mount_path_rules(
    path: str, node: bool, allowed: tuple[str, ...], refusal: tuple[str, str] | None
) -> None:
    assert mount_path_refusal(path, node=node, allowed=allowed) == refusal


@pytest.mark.parametrize(
    ("state_dir", "path", "refusal"),
    [
        ("/srv/agent", "/srv/agent/x", ("under", "/srv/agent")),
        ("/srv/agent", "/srv", ("over", "/srv")),  # would hide the agent's state
        ("/srv/agent", "/srv/agent2", None),
        ("/var/lib/picoord/agent", "/var/lib/picoord/agent", ("over", "/var/lib/picoord/agent")),
    ],
)
def test_the_agents_own_state_dir_is_refused(
    state_dir: str, path: str, refusal: tuple[str, str] | None
) -> None:
    assert mount_path_refusal(path, node=True, extra_trees=(state_dir,)) == refusal


def test_refusals_name_the_field_and_say_how_to_allow() -> None:
    with pytest.raises(FieldError) as caught:
        mount_target("target", "/etc/ufw", node=True)
    assert caught.value.field == "target"
    assert (
        "refusing to mount under /etc" in caught.value.reason and "allow_mount_paths" in caught.value.reason
    )
    with pytest.raises(FieldError) as caught:
        bind_source("source", "/var/lib/picoord/agent", node=True)
    assert caught.value.field == "source" and "bind-mount" in caught.value.reason
    with pytest.raises(FieldError) as caught:
        mount_target("target", "/proc/x", node=True, allowed=("/proc",))
    assert "allow_mount_paths" not in caught.value.reason  # nothing can allow it


@pytest.mark.parametrize(
    ("target", "source", "field"),
    [
        ("/etc", "", "target"),
        ("/mnt/x", "/", "source"),
        ("/mnt/x", "/var", "source"),
        ("/mnt/x", "/proc/1", "source"),
    ],
)
def test_the_coordinators_check_refuses_the_floor(target: str, source: str, field: str) -> None:
    kind = actions_pb2.MOUNT_TYPE_BIND if source else actions_pb2.MOUNT_TYPE_TMPFS
    with pytest.raises(FieldError) as caught:
        mount_spec(actions_pb2.Mount(type=kind, source=source, target=target))
    assert caught.value.field == field


def test_the_lab_and_example_documents_stay_valid() -> None:

    from picoord.coordinator.apply.cluster_spec import parse_spec
    from tests.examples import ROOT, cluster_example

    assert parse_spec((ROOT / "lab" / "demo-cluster.yaml").read_text())
    assert parse_spec(cluster_example())
