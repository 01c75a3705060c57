"""arm64 Pis in the lab: the agent deb installed by apt in a Debian bookworm arm64 root, run
through qemu-user, and the seed's own docker-stack.yml rolled out unchanged.

One lab for the module (about 5 minutes on 2 cores once the arm64 root is cached; building
that root the first time takes longer, see picoord.lab.arm64): pi1..pi3 are arm64, and an
amd64 Pi is named ubuntu-desktop, as in the seed. Select with `-m arm64`.
"""

from __future__ import annotations

import json
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from picoord.lab import arm64
from picoord.lab.cli import _make_lab, build_parser
from picoord.lab.cluster import Lab, check_arm64_options
from picoord.lab.images import MANIFEST_LIST_TYPE, MANIFEST_TYPE, multi_arch_images
from picoord.lab.netns import LabError, check_node_names
from picoord.lab.registry import dockerd_registry_args
from tests.conftest import require_root_or_fail
from tests.test_packages import AGENT, build_debs, debian_mirror

pytestmark = pytest.mark.arm64
lab = pytest.mark.lab

REPO_ROOT = Path(__file__).resolve().parents[2]
SEED_STACK = REPO_ROOT / "examples" / "seed-docker-stack.yml"
ARM64_PIS = ["pi1", "pi2", "pi3"]
DESKTOP = "ubuntu-desktop"
FOOTPRINT_SECONDS = 30.0


# ---------------------------------------------------------------------------------------
# Pure parts (no root).

QEMU_CONF = (
    ":qemu-aarch64:M::\\x7f\\x45\\x4c\\x46:\\xff\\xff\\xff\\xff:/usr/libexec/qemu-binfmt/aarch64-binfmt-P:OPF"
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (QEMU_CONF + "\n", QEMU_CONF),
        ("# comment\n\n" + QEMU_CONF + "\n", QEMU_CONF),
        ("", None),
        ("qemu-aarch64 without the leading colon\n", None),
        (QEMU_CONF + "\n" + QEMU_CONF + "\n", None),
    ],
)
def test_binfmt_line(text: str, expected: str | None) -> None:
    if expected is None:
        with pytest.raises(LabError, match="one binfmt_misc line"):
            arm64.binfmt_line(text)
    else:
        assert arm64.binfmt_line(text) == expected


@pytest.mark.parametrize(
    ("entry", "flags"),
    [
        ("enabled\ninterpreter /usr/libexec/qemu-binfmt/aarch64-binfmt-P\nflags: POF\noffset 0\n", "POF"),
        ("enabled\ninterpreter /x\nflags: \noffset 0\n", ""),
        ("disabled\n", ""),
    ],
)
def test_binfmt_flags(entry: str, flags: str) -> None:
    assert arm64.binfmt_flags(entry) == flags


@pytest.mark.parametrize(
    ("names", "nodes", "expected", "error"),
    [
        ((), 2, ["pi1", "pi2"], None),
        (["pi1", "ubuntu-desktop"], 2, ["pi1", "ubuntu-desktop"], None),
        (["pi1"], 2, None, "one name for each"),
        (["pi1", "pi1"], 2, None, "its own name"),
        (["pi1", "Ubuntu_Desktop"], 2, None, "invalid node name"),
        ("pi1", 1, None, "one name for each"),
    ],
)
def test_check_node_names(names, nodes: int, expected: list[str] | None, error: str | None) -> None:
    if error:
        with pytest.raises(LabError, match=error):
            check_node_names(names, nodes)
    else:
        assert check_node_names(names, nodes) == expected


@pytest.mark.parametrize(
    ("sandboxes", "names", "arm64_nodes", "root", "error"),
    [
        (False, (), (), (), None),
        (True, ["pi1", "desk"], ["pi1"], ["/"], None),
        (True, (), ["pi1", "pi2"], ["/"], None),
        (False, (), ["pi1"], ["/"], "sandboxes=True"),
        (True, (), ["pi1"], (), "need arm64_root"),
        (True, (), (), ["/"], "no arm64_nodes"),
        (True, ["pi1", "desk"], ["pi9"], ["/"], "not in node_names"),
        (True, (), ["pi1", "pi1"], ["/"], "twice"),
        (True, (), ["pi1"], ["/nonexistent-arm64-root"], "not a root file system"),
        (True, (), "pi1", ["/"], "not one string"),
    ],
)
def test_check_arm64_options(sandboxes, names, arm64_nodes, root, error: str | None) -> None:
    if error:
        with pytest.raises(LabError, match=error):
            check_arm64_options(sandboxes, names, arm64_nodes, root)
    else:
        check_arm64_options(sandboxes, names, arm64_nodes, root)


@pytest.mark.parametrize(
    ("mirror", "expected"),
    [
        (None, ["--insecure-registry", "10.0.0.1:5000", "--registry-mirror", "http://10.0.0.1:5000"]),
        (
            "10.0.0.1:5001",
            [
                "--insecure-registry",
                "10.0.0.1:5000",
                "--insecure-registry",
                "10.0.0.1:5001",
                "--registry-mirror",
                "http://10.0.0.1:5001",
            ],
        ),
    ],
)
def test_dockerd_registry_args(mirror: str | None, expected: list[str]) -> None:
    assert dockerd_registry_args("10.0.0.1:5000", mirror) == expected


def test_manifest_lists_name_each_architectures_manifest() -> None:
    lists = multi_arch_images({"amd64": b"\x7fELF-amd64", "arm64": b"\x7fELF-arm64"})
    by_reference = {image_list.reference: image_list for image_list in lists}
    assert {"mcp:1", "mcp:2", "mcp:3", "postgres:15-alpine", "library/mcp-modules-rust:latest"} <= set(
        by_reference
    )
    for image_list in lists:
        document = json.loads(image_list.manifest)
        assert document["mediaType"] == MANIFEST_LIST_TYPE
        entries = {item["platform"]["architecture"]: item for item in document["manifests"]}
        assert set(entries) == {"amd64", "arm64"}
        for image in image_list.images:
            entry = entries[image.architecture]
            assert entry["digest"] == image.manifest_digest
            assert entry["size"] == len(image.manifest) and entry["mediaType"] == MANIFEST_TYPE
    amd64, arm = by_reference["mcp:1"].images
    assert amd64.layers[0].digest != arm.layers[0].digest  # each its own busybox
    assert amd64.layers[1].digest == arm.layers[1].digest  # the same files on top


def test_picoord_lab_up_needs_the_agent_deb_for_arm64_pis() -> None:
    args = build_parser().parse_args(
        ["up", "--sandboxes", "--node-names", "pi1,ubuntu-desktop", "--arm64-nodes", "pi1"]
    )
    with pytest.raises(LabError, match="--agent-deb"):
        _make_lab(args)


def test_pi_root_mounts_the_overlay_first_then_the_pi_paths(tmp_path: Path) -> None:
    commands = arm64.pi_root_commands(
        [tmp_path / "layer", tmp_path / "base"], tmp_path / "pi1", ["/work/lab"]
    )
    merged = tmp_path / "pi1" / "arm64" / "merged"
    assert commands[0][:4] == ["mount", "-t", "overlay", "overlay"]
    assert f"lowerdir={tmp_path / 'layer'}:{tmp_path / 'base'}" in commands[0][5]
    mounted = [argv[-1] for argv in commands[1:] if argv[0] == "mount"]
    assert mounted == [f"{merged}{path}" for path in (*arm64.PI_BINDS, "/work/lab")]
    assert arm64.chroot_argv(tmp_path / "pi1", ["true"])[:2] == ["chroot", str(merged)]


# ---------------------------------------------------------------------------------------
# The lab.


@pytest.fixture(scope="module")
def arm64_lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    require_root_or_fail()
    debs = build_debs(tmp_path_factory.mktemp("debs"))
    root = arm64.agent_root(debian_mirror(), debs[AGENT])
    lab = Lab(
        tmp_path_factory.mktemp("arm64lab"),
        sandboxes=True,
        services=["dockerd"],
        registry=True,
        node_names=[*ARM64_PIS, DESKTOP],
        arm64_nodes=ARM64_PIS,
        arm64_root=root,
        start_timeout=arm64.START_TIMEOUT,
        ready_timeout=arm64.READY_TIMEOUT,
    )
    try:
        lab.up(len(ARM64_PIS) + 1)
        yield lab
    finally:
        lab.down()


def nodes_by_name(lab: Lab) -> dict[str, dict]:
    return {node["name"]: node for node in lab.coordctl_json("nodes")}


@lab
def test_arm64_pis_enroll_and_report_aarch64(arm64_lab: Lab) -> None:
    nodes = nodes_by_name(arm64_lab)
    assert {name: node["status"] for name, node in nodes.items()} == dict.fromkeys(
        [*ARM64_PIS, DESKTOP], "Ready"
    )
    arches = {name: node["arch"] for name, node in nodes.items()}
    assert arches == {**dict.fromkeys(ARM64_PIS, arm64.MACHINE), DESKTOP: "x86_64"}, nodes
    table = arm64_lab.coordctl("nodes", check=True).stdout
    assert arm64.MACHINE in table and DESKTOP in table, table
    # The agent is the deb's, on the root's arm64 python3 (run by qemu), not the venv's.
    argv = arm64_lab.processes["pi1"].argv
    assert "chroot" in argv and "/usr/bin/picoord-agent" in argv, argv
    probe = "import platform, grpc; print(platform.machine(), grpc.__version__)"
    assert in_root(arm64_lab, "pi1", "python3", "-c", probe).split() == [arm64.MACHINE, "1.51.1"]
    assert in_root(arm64_lab, "pi1", "dpkg-query", "-W", "-f=${Status}", AGENT) == "install ok installed"


def in_root(lab: Lab, node: str, *argv: str) -> str:
    """Run argv chrooted in the arm64 Pi's root (inside the Pi) and return its output."""
    done = lab.sandbox(node).run(arm64.chroot_argv(lab.arm64_pi_dir(node), argv), timeout=120, check=True)
    return done.stdout.strip()


@lab
def test_lab_registry_holds_manifest_lists_for_both_architectures(arm64_lab: Lab) -> None:
    request = urllib.request.Request(
        f"http://{arm64_lab.registry_address}/v2/mcp/manifests/1", headers={"Accept": MANIFEST_LIST_TYPE}
    )
    with urllib.request.urlopen(request, timeout=30) as reply:
        document = json.loads(reply.read())
    assert document["mediaType"] == MANIFEST_LIST_TYPE
    assert sorted(item["platform"]["architecture"] for item in document["manifests"]) == ["amd64", "arm64"]


def docker_out(lab: Lab, node: str, *args: str) -> str:
    done = lab.sandbox(node).run(["docker", *args], timeout=180, check=True)
    return done.stdout.strip()


@lab
def test_each_pi_runs_images_of_its_own_architecture(arm64_lab: Lab) -> None:
    assert docker_out(arm64_lab, "pi1", "run", "--rm", "mcp:1", "busybox", "uname", "-m") == arm64.MACHINE
    inspect = ["image", "inspect", "--format", "{{.Architecture}}"]
    assert docker_out(arm64_lab, "pi1", *inspect, "mcp:1") == "arm64"
    assert docker_out(arm64_lab, DESKTOP, "run", "--rm", "mcp:1", "busybox", "uname", "-m") == "x86_64"
    # An arm64-declared pull of the multi-arch tag takes the arm64 image out of the list.
    image = f"{arm64_lab.registry_address}/mcp:2"
    docker_out(arm64_lab, DESKTOP, "pull", "--platform", "linux/arm64", image)
    assert docker_out(arm64_lab, DESKTOP, *inspect, image) == "arm64"
    assert docker_out(arm64_lab, DESKTOP, "run", "--rm", image, "busybox", "uname", "-m") == arm64.MACHINE


def agent_footprint(processes: dict[str, psutil.Process], seconds: float) -> dict[str, tuple[float, float]]:
    """name -> (peak RSS in MiB, CPU as a fraction of one core) of each agent process (and
    its children), sampled every second for `seconds`."""
    families = {name: [agent, *agent.children(recursive=True)] for name, agent in processes.items()}

    def cpu(name: str) -> float:
        return sum(sum(process.cpu_times()[:2]) for process in families[name])

    before = {name: cpu(name) for name in families}
    peaks = dict.fromkeys(families, 0)
    started = time.monotonic()
    while time.monotonic() - started < seconds:
        for name, family in families.items():
            peaks[name] = max(peaks[name], sum(process.memory_info().rss for process in family))
        time.sleep(1.0)
    elapsed = time.monotonic() - started
    return {name: (peaks[name] / 2**20, (cpu(name) - before[name]) / elapsed) for name in families}


@lab
def test_emulated_agent_footprint(arm64_lab: Lab) -> None:
    """RSS and CPU of an idle arm64 agent under qemu-user (EMULATED: qemu's own memory and
    its translation cost included), beside the native amd64 agent of the same lab."""
    agents = {node: psutil.Process(arm64_lab.processes[node].pid) for node in ("pi1", DESKTOP)}
    assert Path(agents["pi1"].exe()).name.startswith("qemu-aarch64"), agents["pi1"].exe()
    figures = agent_footprint(agents, FOOTPRINT_SECONDS)
    (emulated_rss, emulated_cpu), (native_rss, native_cpu) = figures["pi1"], figures[DESKTOP]
    print(
        f"\nagent footprint, idle, over {FOOTPRINT_SECONDS:g} s (metrics every 1 s):"
        f"\n  EMULATED arm64 (Debian's arm64 python3 + the deb, under qemu-user): "
        f"peak RSS {emulated_rss:.1f} MiB, CPU {100 * emulated_cpu:.2f} % of a core"
        f"\n  native amd64 (the lab's venv agent): peak RSS {native_rss:.1f} MiB, "
        f"CPU {100 * native_cpu:.2f} % of a core"
    )
    assert emulated_rss < 400, "the emulated agent should stay within a few hundred MiB"
    assert emulated_cpu < 0.5, "an idle emulated agent should not take half a core"


def running_replicas(lab: Lab, service: str) -> list[dict]:
    return [replica for replica in lab.coordctl_json("ps", service) if replica["state"] == "running"]


@lab
def test_seed_stack_rolls_out_unchanged(arm64_lab: Lab) -> None:
    applied = arm64_lab.coordctl("apply", "-f", str(SEED_STACK), timeout=60)
    assert applied.returncode == 0, applied.stderr
    assert "DATABASE_URL" in applied.stdout + applied.stderr  # the literal secret is warned about
    arm64_lab.coordctl("rollout", "postgres", timeout=300, check=True)
    arm64_lab.coordctl("rollout", "mcp-server", timeout=420, check=True)
    mcp = running_replicas(arm64_lab, "mcp-server")
    postgres = running_replicas(arm64_lab, "postgres")
    assert sorted(replica["node"] for replica in mcp) == ARM64_PIS, mcp
    assert [replica["node"] for replica in postgres] == [DESKTOP], postgres
    # The replicas run arm64 images on the arm64 Pis.
    ids = docker_out(arm64_lab, "pi2", "ps", "-q", "--filter", "label=org.picoord.service=mcp-server")
    assert ids, "no mcp-server container on pi2"
    assert docker_out(arm64_lab, "pi2", "exec", ids.split()[0], "busybox", "uname", "-m") == arm64.MACHINE
