"""Property-based fuzzing of the cluster.yaml reader: whatever text `coordctl apply -f` or
the Apply RPC is given, parse_spec returns documents or raises SpecError, nothing else.

Inputs: random YAML-ish text built from the spec's own vocabulary, and the shipped
examples (examples/cluster.yaml, lab/demo-cluster.yaml) mutated line by line and value by
value. The number of inputs tried is printed at the end of the module (run with -s).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from picoord.coordinator.apply.cluster_spec import SpecError, parse_spec
from tests.examples import cluster_example

ROOT = Path(__file__).resolve().parents[2]
# The example filled in as its reader would (its YOUR_LAN/24 is refused as it stands), so
# mutations start from a valid file.
SEEDS = [
    cluster_example(),
    (ROOT / "lab" / "demo-cluster.yaml").read_text(),
]
TRIED: Counter[str] = Counter()
FUZZ = settings(
    max_examples=800,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

WORDS = [
    "kind", "name", "engine", "manager", "workers", "selector", "nodes", "replica", "bricks", "type",
    "source", "target", "options", "persist", "backend", "default_incoming", "rules", "action", "from",
    "port", "protocol", "comment", "confirm_within_seconds", "ClusterMembership", "GlusterVolume", "Mount",
    "FirewallPolicy", "swarm", "k3s", "kubeadm", "ufw", "nftables", "allow", "deny", "tcp", "udp", "any",
    "pi1", "pi2", "pi1:/data", "/mnt/x", "/etc", "10.0.0.0/24", "10.0.0.1/24", "::/0", "2379:2380",
    "arch=arm64", "true", "false", "null", "~", "0", "-1", "1e400", ".nan", "0x10", "yes", "3", "65536",
]  # fmt: skip
SYMBOLS = [
    ": ", "- ", "\n", "\n  ", "\n    ", "---\n", "{", "}", "[", "]", ", ", "&a ", "*a", "!!str ", "!!binary ",
    "!!python/object:os.system ", "? ", "|\n  ", ">\n  ", "'", '"', "#", "%YAML 1.1\n", "<<: *a\n", "\t",
    "\x00", "\u202e", "\ufeff", "é",
]  # fmt: skip
# Values a mutation puts in place of a scalar: wrong types, edge numbers, tags, huge texts.
ODD_VALUES = [
    "", "null", "~", "[]", "{}", "[a, [b, [c]]]", "{a: {b: {c: d}}}", "-1", "0", "1", "2", "17", "1e400",
    "-.inf", ".nan", "0o777", "0x1F", "yes", "no", "'quoted'", '"\\u0000"', "!!binary aGk=", "!!int '3'",
    "!!float 1", "!!set {a, b}", "!!timestamp 2001-12-14", "&anchor x", "*anchor", "x" * 70, "y" * 5000,
    "pi1:/", ":/data", "/", "/etc/passwd", "../..", "10.0.0.1/33", "300.1.1.1/8", "65536", "0:0",
    "2380:2379", "a=b=c", "arch=", "=arm64", "!!python/name:os.system",
]  # fmt: skip


@pytest.fixture(scope="module", autouse=True)
def report_inputs_tried() -> Iterator[None]:
    yield
    print(f"\nspec fuzzing: {sum(TRIED.values())} inputs tried ({dict(TRIED)})")


def check(text: str | bytes) -> None:
    try:
        documents = parse_spec(text)
    except SpecError as error:
        assert str(error)
        TRIED["refused"] += 1
        return
    assert isinstance(documents, list) and documents
    TRIED["accepted"] += 1


@FUZZ
@given(st.lists(st.sampled_from(WORDS + SYMBOLS) | st.text(max_size=8), max_size=80))
def test_random_yamlish_text(pieces: list[str]) -> None:
    check("".join(pieces))


@FUZZ
@given(st.binary(max_size=600))
def test_random_bytes(data: bytes) -> None:
    check(data)


MUTATIONS = ["delete", "duplicate", "swap", "indent", "dedent", "value", "insert", "truncate"]


@st.composite
def mutated_seed(draw: st.DrawFn) -> str:
    lines = draw(st.sampled_from(SEEDS)).splitlines(keepends=True)
    for _ in range(draw(st.integers(1, 5))):
        if not lines:
            break
        at = draw(st.integers(0, len(lines) - 1))
        operation = draw(st.sampled_from(MUTATIONS))
        line = lines[at]
        if operation == "delete":
            del lines[at]
        elif operation == "duplicate":
            lines[at:at] = [line] * draw(st.sampled_from([1, 2, 3, 257, 513]) | st.integers(1, 20))
        elif operation == "swap":
            other = draw(st.integers(0, len(lines) - 1))
            lines[at], lines[other] = lines[other], lines[at]
        elif operation == "indent":
            lines[at] = " " * draw(st.integers(1, 6)) + line
        elif operation == "dedent":
            lines[at] = line.lstrip()
        elif operation == "value":
            key, colon, _rest = line.partition(": ")
            if colon:
                lines[at] = f"{key}: {draw(st.sampled_from(ODD_VALUES))}\n"
            else:
                lines[at] = line.replace("pi", draw(st.sampled_from(ODD_VALUES)), 1)
        elif operation == "insert":
            lines.insert(at, "".join(draw(st.lists(st.sampled_from(WORDS + SYMBOLS), max_size=8))) + "\n")
        else:
            lines[at] = line[: draw(st.integers(0, len(line)))]
    return "".join(lines)


@settings(FUZZ, max_examples=500)
@given(mutated_seed())
def test_mutated_examples(text: str) -> None:
    check(text)


@pytest.mark.parametrize("seed", SEEDS, ids=["examples/cluster.yaml", "lab/demo-cluster.yaml"])
def test_seeds_are_valid(seed: str) -> None:
    assert parse_spec(seed)


@pytest.mark.parametrize(
    "text",
    [
        b"\xff\xfe not utf-8",
        "kind: Mount\nname: [a]\n",
        "a: &a [*a]\n",
        "? [a]\n: b\n",
        "kind: FirewallPolicy\nname: x\nnodes: [pi1]\nrules: " + "[" * 5000 + "]" * 5000 + "\n",
        "x" * (1024 * 1024 + 1),
    ],
    ids=["not-utf8", "name-a-list", "self-alias", "list-key", "deep-nesting", "too-big"],
)
def test_awkward_documents_are_spec_errors(text: str | bytes) -> None:
    with pytest.raises(SpecError):
        parse_spec(text)
