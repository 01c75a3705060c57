"""The scheduler: feasibility with a reason per node, spread, thermal preference, determinism."""

import pytest

from picoord.common.validation import FieldError
from picoord.coordinator.placement.constraints import NodeFacts, Spread, parse_constraint
from picoord.coordinator.placement.scheduler import (
    ALL_GPUS,
    MIB,
    Load,
    Node,
    Placed,
    Request,
    SchedulerConfig,
    check_spread,
    explain,
    is_hot,
    load_score,
    place,
    reserve_bytes,
)

GIB = 1024 * MIB
COOL = Load(cpu_percent=10, memory_available_bytes=800 * MIB, soc_celsius=45, throttled=0)


def pi(name, memory=GIB, cores=4, arch="aarch64", load=COOL, labels=None, ready=True, draining=False, gpus=0):
    facts = NodeFacts(name, arch=arch, labels=labels or {})
    return Node(facts, memory, cores, gpus=gpus, ready=ready, draining=draining, load=load)


def arch(text="aarch64"):
    return (parse_constraint("c", f"node.platform.arch == {text}"),)


# --- the system reserve and the memory arithmetic ---------------------------------------


@pytest.mark.parametrize(
    ("total", "reserved"),
    [
        (GIB, 128 * MIB),  # 10% would be 102 MiB: the floor wins on a 1 GB Pi
        (512 * MIB, 128 * MIB),
        (2 * GIB, 205 * MIB - 0.2 * MIB + 1),  # ceil(10%) of 2 GiB
        (4 * GIB, -(-4 * GIB // 10)),
        (55 * GIB, -(-55 * GIB // 10)),
    ],
)
def test_reserve(total, reserved):
    assert reserve_bytes(total) == int(reserved)


def test_reserve_is_configurable():
    assert reserve_bytes(GIB, SchedulerConfig(reserve_fraction=0.2, reserve_min_bytes=0)) == -(-GIB // 5)


@pytest.mark.parametrize(
    ("request_mib", "placed_mib", "fits"),
    [
        (896, 0, True),  # exactly the allocatable memory of a 1 GB Pi
        (897, 0, False),
        (256, 640, True),
        (256, 641, False),
        (0, 2000, True),  # a request of nothing always fits, as a best-effort pod does
    ],
)
def test_never_more_requested_memory_than_the_node_can_give(request_mib, placed_mib, fits):
    placed = [Placed("other", "pi1", memory_bytes=placed_mib * MIB)] if placed_mib else []
    result = place([pi("pi1")], placed, Request("mcp", 1, memory_bytes=request_mib * MIB))
    assert (result.assignments == ("pi1",)) is fits
    if not fits:
        left = 896 - placed_mib
        assert result.reason == (
            f"0/1 nodes available: 1 insufficient memory ({request_mib} MiB requested, "
            f"{max(0, left)} MiB allocatable)"
        )


def test_replicas_placed_in_one_call_hold_memory_for_the_next():
    # 3 x 500 MiB on two 1 GB Pis (896 MiB allocatable): one each, the third fits nowhere
    result = place([pi("pi1"), pi("pi2")], [], Request("mcp", 3, memory_bytes=500 * MIB))
    assert result.assignments == ("pi1", "pi2")
    assert result.unplaced == 1
    assert (
        result.reason == "0/2 nodes available: 2 insufficient memory (500 MiB requested, 396 MiB allocatable)"
    )
    assert result.rejected == {
        "pi1": "insufficient memory (500 MiB requested, 396 MiB allocatable)",
        "pi2": "insufficient memory (500 MiB requested, 396 MiB allocatable)",
    }
    assert not result.complete


# --- every rejection reason, and the Kubernetes-shaped summary -----------------------------


def test_the_summary_from_the_issue():
    nodes = [
        pi("desktop", memory=55 * GIB, arch="x86_64"),
        pi("mac", arch="x86_64"),
        pi("nuc", arch="amd64"),
        pi("pi1"),
        pi("pi2"),
    ]
    placed = [Placed("db", "pi1", memory_bytes=716 * MIB), Placed("db", "pi2", memory_bytes=716 * MIB)]
    result = place(nodes, placed, Request("mcp", 1, memory_bytes=256 * MIB, constraints=arch()))
    assert result.reason == (
        "0/5 nodes available: 3 node.arch != aarch64, "
        "2 insufficient memory (256 MiB requested, 180 MiB allocatable)"
    )
    assert result.rejected["desktop"] == "node.arch != aarch64"
    assert result.assignments == ()
    assert result.unplaced == 1


@pytest.mark.parametrize(
    ("node", "wanted", "placed", "reason"),
    [
        (pi("pi1", ready=False), Request("mcp"), [], "not ready"),
        (pi("pi1", draining=True), Request("mcp"), [], "draining"),
        (pi("pi1", arch="armv7l"), Request("mcp", constraints=arch()), [], "node.arch != aarch64"),
        (
            pi("pi1"),
            Request("mcp", constraints=(parse_constraint("c", "node.hostname != pi1"),)),
            [],
            "node.hostname == pi1",
        ),
        (
            pi("pi1"),
            Request("mcp", constraints=(parse_constraint("c", "node.labels.disk == ssd"),)),
            [],
            "node.labels.disk != ssd",
        ),
        (
            pi("pi1"),
            Request("mcp", spread=Spread(max_per_node=1)),
            [Placed("mcp", "pi1")],
            "already running mcp (max 1 per node)",
        ),
        (
            pi("pi1"),
            Request("mcp", memory_bytes=GIB),
            [],
            "insufficient memory (1024 MiB requested, 896 MiB allocatable)",
        ),
        (
            pi("pi1"),
            Request("mcp", memory_bytes=100 * MIB),
            [Placed("x", "pi1", memory_bytes=GIB)],
            "insufficient memory (100 MiB requested, 0 MiB allocatable)",
        ),
        (
            pi("pi1"),
            Request("mcp", cpu_millis=4001),
            [],
            "insufficient cpu (4001m requested, 4000m allocatable)",
        ),
        (
            pi("pi1"),
            Request("mcp", cpu_millis=500),
            [Placed("x", "pi1", cpu_millis=3700)],
            "insufficient cpu (500m requested, 300m allocatable)",
        ),
        (pi("pi1"), Request("mcp", gpus=1), [], "insufficient gpu (1 requested, 0 free)"),
        (pi("gpu", gpus=1), Request("mcp", gpus=2), [], "insufficient gpu (2 requested, 1 free)"),
        (
            pi("gpu", gpus=1),
            Request("mcp", gpus=1),
            [Placed("x", "gpu", gpus=1)],
            "insufficient gpu (1 requested, 0 free)",
        ),
        (
            pi("gpu", gpus=2),
            Request("mcp", gpus=ALL_GPUS),
            [Placed("x", "gpu", gpus=1)],
            "insufficient gpu (all requested, 1 free)",
        ),
        (
            pi("gpu", gpus=2),
            Request("mcp", gpus=1),
            [Placed("x", "gpu", gpus=ALL_GPUS)],
            "insufficient gpu (1 requested, 0 free)",
        ),
        (pi("cpu-only"), Request("mcp", gpus=ALL_GPUS), [], "insufficient gpu (all requested, 0 free)"),
    ],
)
def test_every_rejection_reason(node, wanted, placed, reason):
    result = place([node], placed, wanted)
    assert result.rejected == {node.name: reason}
    assert result.reason.endswith(f"0/1 nodes available: 1 {reason}")
    assert result.unplaced == 1


def test_checks_go_in_order_the_first_failure_is_the_reason():
    # not ready AND wrong arch AND too small: reported as not ready
    node = pi("pi1", arch="armv7l", ready=False, draining=True)
    result = place([node], [], Request("mcp", memory_bytes=2 * GIB, constraints=arch()))
    assert result.rejected == {"pi1": "not ready"}
    node = pi("pi1", arch="armv7l", draining=True)
    assert place([node], [], Request("mcp", constraints=arch())).rejected == {"pi1": "draining"}


@pytest.mark.parametrize(
    ("wanted", "placed", "ok"),
    [
        (Request("mcp", gpus=1), [], True),
        (Request("mcp", gpus=2), [], True),
        (Request("mcp", gpus=ALL_GPUS), [], True),
        (Request("mcp", gpus=1), [Placed("x", "gpu", gpus=1)], True),
        (Request("mcp", gpus=2), [Placed("x", "gpu", gpus=1)], False),
    ],
)
def test_gpus_fit(wanted, placed, ok):
    result = place([pi("gpu", memory=55 * GIB, gpus=2)], placed, wanted)
    assert (result.assignments == ("gpu",)) is ok


def test_summary_groups_memory_with_the_largest_allocatable():
    placed = [Placed("x", "pi1", memory_bytes=700 * MIB), Placed("x", "pi2", memory_bytes=800 * MIB)]
    result = place([pi("pi1"), pi("pi2")], placed, Request("mcp", memory_bytes=256 * MIB))
    assert result.reason == (
        "0/2 nodes available: 2 insufficient memory (256 MiB requested, at most 196 MiB allocatable)"
    )
    assert result.rejected["pi2"] == "insufficient memory (256 MiB requested, 96 MiB allocatable)"


def test_summary_orders_by_count_then_text_and_counts_every_node():
    nodes = [
        pi("a", ready=False),
        pi("b", draining=True),
        pi("c", draining=True),
        pi("d", arch="x86_64"),
        pi("e", cores=1),
        pi("f", cores=1),
        pi("g", cores=1),
    ]
    result = place(
        nodes, [Placed("x", "g", cpu_millis=500)], Request("mcp", cpu_millis=2000, constraints=arch())
    )
    assert result.reason == (
        "0/7 nodes available: 3 insufficient cpu (2000m requested, at most 1000m allocatable), "
        "2 draining, 1 node.arch != aarch64, 1 not ready"
    )


def test_explain_with_nothing_rejected():
    assert explain(0, 0, {}, Request("mcp")) == "0/0 nodes available"
    result = place([], [], Request("mcp", 2))
    assert (result.assignments, result.unplaced, result.reason) == ((), 2, "0/0 nodes available")


def test_zero_replicas_places_nothing_and_is_complete():
    result = place([pi("pi1")], [], Request("mcp", 0))
    assert result.assignments == () and result.complete


# --- spread -------------------------------------------------------------------------------


def test_replicas_spread_fewest_of_the_service_first():
    nodes = [pi("pi1"), pi("pi2"), pi("pi3")]
    assert place(nodes, [], Request("mcp", 3)).assignments == ("pi1", "pi2", "pi3")
    assert place(nodes, [], Request("mcp", 5)).assignments == ("pi1", "pi2", "pi3", "pi1", "pi2")
    existing = [Placed("mcp", "pi1"), Placed("mcp", "pi1"), Placed("mcp", "pi2")]
    assert place(nodes, existing, Request("mcp", 2)).assignments == ("pi3", "pi2")


def test_other_services_do_not_count_for_spread_only_for_load():
    nodes = [pi("pi1"), pi("pi2")]
    # pi1 runs another service: mcp still sees 0 on both; the load score then prefers pi2
    existing = [Placed("db", "pi1", memory_bytes=500 * MIB)]
    assert place(nodes, existing, Request("mcp", 1, memory_bytes=100 * MIB)).assignments == ("pi2",)


def test_one_per_node_places_on_distinct_nodes_and_explains_the_shortfall():
    nodes = [pi("pi1"), pi("pi2"), pi("desktop", arch="x86_64")]
    request = Request("mcp", 3, constraints=arch(), spread=Spread(max_per_node=1))
    result = place(nodes, [], request)
    assert result.assignments == ("pi1", "pi2")
    assert result.unplaced == 1
    assert result.reason == (
        "3 replicas of mcp with at most 1 per node need 3 nodes; 2 of 3 are ready and match; "
        "0/3 nodes available: 2 already running mcp (max 1 per node), 1 node.arch != aarch64"
    )


def test_max_per_node_two():
    nodes = [pi("pi1"), pi("pi2")]
    result = place(nodes, [Placed("mcp", "pi1"), Placed("mcp", "pi1")], Request("mcp", 3, spread=Spread(2)))
    assert result.assignments == ("pi2", "pi2")
    assert result.rejected == {
        "pi1": "already running mcp (max 2 per node)",
        "pi2": "already running mcp (max 2 per node)",
    }
    assert result.reason.startswith(
        "5 replicas of mcp with at most 2 per node need 3 nodes; 2 of 2 are ready and match; 0/2"
    )


@pytest.mark.parametrize(
    ("replicas", "limit", "matching", "error"),
    [
        (3, 1, 3, None),
        (4, 1, 3, "4 replicas with at most 1 per node need 4 nodes, but only 3 match"),
        (5, 2, 3, None),
        (7, 2, 3, "7 replicas with at most 2 per node need 4 nodes, but only 3 match"),
        (9, 0, 1, None),  # no limit
        (1, 1, 0, "1 replicas with at most 1 per node need 1 nodes, but only 0 match"),
    ],
)
def test_check_spread_refuses_more_replicas_than_nodes(replicas, limit, matching, error):
    if error is None:
        check_spread("deploy.replicas", replicas, Spread(limit), matching)
    else:
        with pytest.raises(FieldError) as caught:
            check_spread("deploy.replicas", replicas, Spread(limit), matching)
        assert caught.value.field == "deploy.replicas"
        assert error in str(caught.value)


def test_spread_over_a_label_balances_zones_before_nodes():
    nodes = [
        pi("a1", labels={"zone": "a"}),
        pi("a2", labels={"zone": "a"}),
        pi("a3", labels={"zone": "a"}),
        pi("b1", labels={"zone": "b"}),
    ]
    request = Request("mcp", 4, spread=Spread(over_label="zone"))
    # a1 (zone a), b1 (zone b), then zone a again with its emptiest node, then b1 again
    assert place(nodes, [], request).assignments == ("a1", "b1", "a2", "b1")


def test_spread_over_a_label_treats_unlabelled_nodes_as_one_group():
    nodes = [pi("x1"), pi("x2"), pi("z1", labels={"zone": "z"})]
    assert place(nodes, [], Request("mcp", 3, spread=Spread(over_label="zone"))).assignments == (
        "x1",
        "z1",
        "x2",
    )


# --- thermal and load preference ----------------------------------------------------------

HOT = Load(cpu_percent=5, memory_available_bytes=900 * MIB, soc_celsius=82, throttled=0)
UNDER_VOLTAGE_NOW = Load(cpu_percent=5, memory_available_bytes=900 * MIB, soc_celsius=40, throttled=0x1)
THROTTLED_NOW = Load(cpu_percent=5, memory_available_bytes=900 * MIB, soc_celsius=40, throttled=0x4)
SOFT_LIMIT_NOW = Load(cpu_percent=5, memory_available_bytes=900 * MIB, soc_celsius=40, throttled=0x8)
CAPPED_NOW = Load(cpu_percent=5, memory_available_bytes=900 * MIB, soc_celsius=40, throttled=0x2)
THROTTLED_BEFORE = Load(cpu_percent=10, memory_available_bytes=800 * MIB, soc_celsius=45, throttled=0x50000)
BUSY = Load(cpu_percent=90, memory_available_bytes=800 * MIB, soc_celsius=45)
WARM = Load(cpu_percent=10, memory_available_bytes=800 * MIB, soc_celsius=70)
FULL = Load(cpu_percent=10, memory_available_bytes=100 * MIB, soc_celsius=45)


@pytest.mark.parametrize(
    ("load", "hot"),
    [
        (COOL, False),
        (Load(), False),
        (Load(soc_celsius=79.9), False),
        (Load(soc_celsius=80), True),
        (HOT, True),
        (UNDER_VOLTAGE_NOW, True),
        (CAPPED_NOW, True),
        (THROTTLED_NOW, True),
        (SOFT_LIMIT_NOW, True),
        (THROTTLED_BEFORE, False),  # since boot only: a penalty, not hot
    ],
)
def test_is_hot(load, hot):
    assert is_hot(pi("pi1", load=load)) is hot


@pytest.mark.parametrize("hot_load", [HOT, UNDER_VOLTAGE_NOW, THROTTLED_NOW, SOFT_LIMIT_NOW, CAPPED_NOW])
def test_hot_nodes_are_avoided_while_a_cool_one_fits(hot_load):
    # the hot node is first by name and emptier: still not chosen
    nodes = [pi("a-hot", load=hot_load), pi("b-cool")]
    result = place(nodes, [Placed("mcp", "b-cool")], Request("mcp", 1))
    assert result.assignments == ("b-cool",)
    assert result.warnings == ()


def test_hot_nodes_are_the_last_resort_with_a_warning():
    nodes = [pi("a-hot", load=HOT), pi("b-cool", memory=512 * MIB)]
    result = place(nodes, [], Request("mcp", 1, memory_bytes=500 * MIB))
    assert result.assignments == ("a-hot",)
    assert result.warnings == ("a-hot is hot (82 C) but no cool node fits",)
    result = place([pi("u", load=UNDER_VOLTAGE_NOW)], [], Request("mcp"))
    assert result.warnings == ("u is hot (under-voltage) but no cool node fits",)


@pytest.mark.parametrize(
    ("loads", "expected"),
    [
        ({"a": BUSY, "b": COOL}, "b"),
        ({"a": WARM, "b": COOL}, "b"),
        ({"a": FULL, "b": COOL}, "b"),
        ({"a": THROTTLED_BEFORE, "b": COOL}, "b"),
        ({"a": COOL, "b": COOL}, "a"),  # a tie: by name
        ({"a": Load(), "b": COOL}, "b"),  # no metrics yet: assumed half busy
        ({"a": WARM, "b": BUSY}, "a"),  # 70 C costs less than 90% CPU
    ],
)
def test_load_score_prefers_cool_idle_roomy_nodes(loads, expected):
    nodes = [pi(name, load=load) for name, load in loads.items()]
    assert place(nodes, [], Request("mcp", 1)).assignments == (expected,)


@pytest.mark.parametrize(
    ("load", "placed", "request_mib", "score"),
    [
        (Load(cpu_percent=0, memory_available_bytes=GIB, soc_celsius=50), 0, 0, 0.0),
        (Load(cpu_percent=100, memory_available_bytes=0, soc_celsius=80, throttled=1 << 18), 0, 0, 1.0),
        (Load(cpu_percent=50), 0, 448, 0.4 * 0.5 + 0.3 * 0.5),
        (Load(cpu_percent=0, soc_celsius=65), 0, 0, 0.2 * 0.5),
        (Load(cpu_percent=0, soc_celsius=20), 0, 0, 0.0),
        (Load(cpu_percent=0, soc_celsius=95), 0, 0, 0.2),
        (Load(cpu_percent=250), 0, 0, 0.4),  # clamped
        (Load(), 896, 0, 0.2 + 0.3),
        (Load(cpu_percent=0, memory_available_bytes=GIB // 4), 0, 0, 0.3 * 0.75),
    ],
)
def test_load_score_weights(load, placed, request_mib, score):
    assert load_score(pi("p", load=load), placed * MIB, request_mib * MIB) == pytest.approx(score)


def test_spread_outranks_load_but_not_heat():
    nodes = [pi("a", load=BUSY), pi("b", load=COOL), pi("c", load=HOT)]
    # b already has one: the busy but empty node a gets the next one, then the cool b;
    # the empty hot c gets none while the others fit
    assert place(nodes, [Placed("mcp", "b")], Request("mcp", 2)).assignments == ("a", "b")


# --- readiness, draining, determinism -----------------------------------------------------


def test_only_ready_non_draining_nodes_get_new_replicas():
    nodes = [pi("pi1", ready=False), pi("pi2", draining=True), pi("pi3")]
    result = place(nodes, [], Request("mcp", 2))
    assert result.assignments == ("pi3", "pi3")
    assert result.complete


def test_deterministic_whatever_the_input_order():
    nodes = [pi(f"pi{i}") for i in range(6)]
    placed = [Placed("mcp", "pi3"), Placed("db", "pi0", memory_bytes=300 * MIB)]
    request = Request("mcp", 4, memory_bytes=64 * MIB)
    first = place(nodes, placed, request)
    assert place(list(reversed(nodes)), list(reversed(placed)), request) == first
    assert first.assignments == ("pi1", "pi2", "pi4", "pi5")


# --- global services ----------------------------------------------------------------------


def test_global_one_per_matching_ready_node_without_one():
    nodes = [
        pi("desktop", arch="x86_64"),
        pi("pi1"),
        pi("pi2"),
        pi("pi3", ready=False),
        pi("pi4", draining=True),
        pi("pi5", load=HOT),
    ]
    result = place(
        nodes, [Placed("exporter", "pi1")], Request("exporter", global_mode=True, constraints=arch())
    )
    assert result.assignments == ("pi2", "pi5")
    assert result.warnings == ("pi5 is hot (82 C); global replica placed",)
    assert result.unplaced == 0
    assert result.reason == ""  # mismatches are not failures for a global service
    assert result.rejected == {"desktop": "node.arch != aarch64", "pi3": "not ready", "pi4": "draining"}


def test_global_reports_matching_nodes_without_room_as_pending():
    nodes = [pi("pi1"), pi("pi2")]
    result = place(
        nodes,
        [Placed("db", "pi2", memory_bytes=800 * MIB)],
        Request("x", global_mode=True, memory_bytes=200 * MIB),
    )
    assert result.assignments == ("pi1",)
    assert result.unplaced == 1
    assert (
        result.reason == "1/2 nodes available: 1 insufficient memory (200 MiB requested, 96 MiB allocatable)"
    )


def test_global_with_no_matching_node_says_why():
    result = place([pi("pi1"), pi("pi2")], [], Request("x", global_mode=True, constraints=arch("amd64")))
    assert result.assignments == ()
    assert result.reason == "0/2 nodes available: 2 node.arch != amd64"
